"""One registry to build the networks the search prunes by name (:mod:`.architectures`).

Adding a model is one factory function (keyword-only ``image_shape``, ``num_classes`` and its own
options) and one line in :data:`MODELS`. The factory's keyword options are what ``model.*`` in the
config may set; anything else is refused by name, so a typo cannot silently fall back to a default.

Initialisation is ours, not PyTorch's: every weight is drawn from the caller's generator, so one
seed gives bit-identical weights on any machine, and nothing touches the global RNG (models are
built on the meta device and only then given real storage).

Someone's own network is a factory named ``"<package.module>:<callable>"`` (any importable
callable returning an ``nn.Module``), or ``"torchvision:<name>"`` for a torchvision
classification model (built with ``weights=None``: nothing is downloaded). Its options are its
keyword arguments, and ``num_classes`` and ``image_shape`` are passed where its signature takes
them. Its initialisation is its own (what its constructor draws), run inside a forked RNG seeded
from the caller's generator: seeds differ, a seed repeats on one machine, and the global RNG is
left as it was.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .architectures import (
    ImageShape,
    bool_option,
    convnet,
    lenet_300_100,
    positive_int_option,
    resnet18,
    resnet20,
    resnet50,
    vgg16,
)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "convnet": convnet,
    "resnet20": resnet20,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


# BatchNorm options every model with BatchNorm accepts, besides its factory's own. Their defaults
# are PyTorch's and OpenLTH's; the authors' code (TLAB ``models/resnet.py``, ``models/vgg.py``)
# builds BatchNorm with ``track_running_stats=False`` and draws γ from U(0, 1).
BN_OPTIONS = {"bn_running_stats": True, "bn_weight_init": "ones"}
BN_WEIGHT_INITS = ("ones", "uniform")


def _norm_options(options: dict) -> tuple[dict, dict]:
    """``options`` split into the factory's own and the BatchNorm options (defaults filled in)."""
    norm = {k: options[k] for k in BN_OPTIONS if k in options}
    bool_option("model.options.bn_running_stats", norm.get("bn_running_stats", True))
    if norm.get("bn_weight_init", "ones") not in BN_WEIGHT_INITS:
        raise ValueError(f"model.options.bn_weight_init must be one of {', '.join(BN_WEIGHT_INITS)}, "
                         f"got {norm['bn_weight_init']!r}")
    return {k: v for k, v in options.items() if k not in BN_OPTIONS}, {**BN_OPTIONS, **norm}


def _without_running_stats(model: nn.Module) -> None:
    """Every BatchNorm normalises with the batch's statistics, in training and in evaluation alike
    (``track_running_stats=False``): no running statistics exist to be used or updated."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None


@contextmanager
def neutral_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers built without running statistics have neutral ones
    (mean 0, variance 1), so in evaluation mode every BatchNorm is a fixed affine map, as the
    structural methods (SynFlow, the connectivity check) need: on their all-ones input, batch
    statistics would see no variance and cut every path. Layers with running statistics keep them."""
    bare = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
    for m in bare:
        like = m.weight if m.weight is not None else torch.empty(0)
        m.running_mean = torch.zeros(m.num_features, dtype=like.dtype, device=like.device)
        m.running_var = torch.ones(m.num_features, dtype=like.dtype, device=like.device)
    try:
        yield
    finally:
        for m in bare:
            m.running_mean = m.running_var = None


TORCHVISION = "torchvision:"


def is_own_model(name: str) -> bool:
    """Whether ``name`` names someone's factory (``module:callable``, ``torchvision:<name>``)
    rather than one of :data:`MODELS`."""
    return ":" in name


def own_factory(name: str) -> Callable[..., nn.Module]:
    """The callable ``name`` names, imported; a ``ValueError`` naming what is missing otherwise."""
    if name.startswith(TORCHVISION):
        import torchvision

        model = name.removeprefix(TORCHVISION)
        known = torchvision.models.list_models(module=torchvision.models)  # the classification models
        if model not in known:
            raise ValueError(f"model.name {name!r}: torchvision has no classification model {model!r} "
                             f"(e.g. {', '.join(known[:6])}, …)")
        return lambda **kwargs: torchvision.models.get_model(model, weights=None, **kwargs)
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"model.name {name!r}: a factory is named '<package.module>:<callable>'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model.name {name!r}: module {module_name!r} does not import ({exc})") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"model.name {name!r}: module {module_name!r} has no {attribute!r}")
    if not callable(factory):
        raise ValueError(f"model.name {name!r}: {attribute!r} in {module_name!r} is not callable")
    return factory


def _construct_own(name: str, image_shape: ImageShape, num_classes: int, options: dict) -> nn.Module:
    """Run someone's factory with ``options`` and, where it takes them, ``num_classes`` and
    ``image_shape``; refuse, naming it, a factory that fails or returns something else."""
    factory = own_factory(name)
    extra = {"num_classes": num_classes, "image_shape": tuple(image_shape)}
    try:
        parameters = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        passed = {k: v for k, v in extra.items() if k in parameters and k not in options}
    except (TypeError, ValueError):  # no signature to read (a builtin): pass the class count only
        takes_any, passed = True, {"num_classes": num_classes}
    if name.startswith(TORCHVISION):
        passed = {"num_classes": num_classes}
    elif takes_any and "num_classes" not in options:
        passed.setdefault("num_classes", num_classes)
    try:
        model = factory(**options, **passed)
    except Exception as exc:  # the user's code: say whose call failed, in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model.name {name!r} with options {options}: the factory raised "
                         f"{type(exc).__name__}: {reason}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name {name!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _own_model(name: str, image_shape: ImageShape, num_classes: int, options: dict,
               generator: torch.Generator | None) -> nn.Module:
    """Someone's model, built and initialised by its own factory on the CPU, inside a forked RNG
    seeded from ``generator`` (the global RNG's state is restored afterwards). Built for real, not on
    the meta device: a factory may do anything (read a file, fill a tensor) that meta cannot."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
        torch.manual_seed(seed)
        return _construct_own(name, image_shape, num_classes, options)


def _construct(
    name: str, image_shape: ImageShape, num_classes: int, options: dict
) -> tuple[nn.Module, ImageShape, dict]:
    """Validate everything the config controls, then run the factory (on whatever device is set).
    Returns the model, the image shape and the BatchNorm options."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (model.name); known: {', '.join(sorted(MODELS))}")
    factory = MODELS[name]
    options, norm = _norm_options(options)
    accepted = sorted(
        p.name for p in inspect.signature(factory).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in ("image_shape", "num_classes")
    )
    for option in sorted(options):
        if option not in accepted:
            raise ValueError(
                f"model option {option!r} is not accepted by {name}; "
                f"it accepts: {', '.join(accepted) or 'none'}"
                + (f" (and {', '.join(BN_OPTIONS)}, as every model with BatchNorm)" if option.startswith("bn") else "")
            )
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                  for s in shape):
        raise ValueError(f"image_shape must be three positive integers (C, H, W), got {image_shape!r}")
    positive_int_option("num_classes", num_classes)
    model = factory(image_shape=shape, num_classes=num_classes, **options)
    has_norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for option, default in BN_OPTIONS.items():
        if norm[option] != default and not has_norms:
            raise ValueError(f"model option {option!r} needs BatchNorm layers, and {name} has none")
    if not norm["bn_running_stats"]:
        _without_running_stats(model)
    return model, shape, norm


@torch.no_grad()
def _initialise(model: nn.Module, generator: torch.Generator | None, bn_weight_init: str = "ones") -> None:
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            if bn_weight_init == "uniform":  # the authors' bn_init: γ ~ U(0, 1)
                nn.init.uniform_(module.weight, 0.0, 1.0, generator=generator)
            else:
                nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()
        elif list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
            # After to_empty() its storage is garbage: refuse rather than train on it.
            raise TypeError(f"no initialisation for {module_name} ({type(module).__name__}); "
                            "add one to models._initialise")


def build_model(name: str, *, image_shape: ImageShape, num_classes: int,
                generator: torch.Generator | None = None, **options) -> nn.Module:
    """Build model ``name`` on the CPU with weights drawn from ``generator``.

    Kaiming-normal (fan-in, ReLU gain) for every conv and linear weight, zero biases, BatchNorm at
    the identity (γ ~ U(0, 1) with ``bn_weight_init: uniform``). The same generator state gives
    bit-identical weights; the global RNG is used only when ``generator`` is None.

    Every model with BatchNorm also takes ``bn_running_stats`` (default true; false: batch
    statistics in evaluation too, so the evaluation batch size is part of the recipe) and
    ``bn_weight_init`` (``ones`` or ``uniform``).

    Someone's own factory (:func:`is_own_model`) initialises its model itself, on the CPU, inside a
    forked RNG seeded from ``generator``.
    """
    if is_own_model(name):
        return _own_model(name, image_shape, num_classes, options, generator)
    with torch.device("meta"):
        model, _, norm = _construct(name, image_shape, num_classes, options)
    model = model.to_empty(device="cpu")
    _initialise(model, generator, norm["bn_weight_init"])
    return model


def skeleton(name: str, *, image_shape: ImageShape, num_classes: int, **options) -> nn.Module:
    """Model ``name`` on the meta device: every shape, no storage, no initialisation (for counts).
    Someone's own model is built on the CPU (:func:`_own_model`)."""
    if is_own_model(name):
        return _own_model(name, image_shape, num_classes, options, None)
    with torch.device("meta"):
        return _construct(name, image_shape, num_classes, options)[0]


def check_model_fits(name: str, *, image_shape: ImageShape, num_classes: int, **options) -> None:
    """Fail early, with a readable reason, when model ``name`` cannot take this dataset's images.

    Runs one forward pass of two blank images through the model's uninitialised weights, in eval
    mode. (A forward on the meta device computes shapes only, but its first BatchNorm goes through
    torch's Python decompositions and imports torch._dynamo: 1.5 s at every run start.)
    """
    if is_own_model(name):
        model, shape = _own_model(name, image_shape, num_classes, options, None).eval(), tuple(image_shape)
    else:
        with torch.device("meta"):
            model, shape, _ = _construct(name, image_shape, num_classes, options)
        model = model.to_empty(device="cpu").eval()
    # Remember the last module entered, so the reason can name the layer where shapes broke.
    # (The model is thrown away afterwards, so the hooks need no removing.)
    entered: list[str] = []
    for module_name, module in model.named_modules():
        if module_name:
            module.register_forward_pre_hook(
                lambda m, _x, n=module_name: entered.append(f"{n}, {type(m).__name__}")
            )
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as error:
        at = f" (at {entered[-1]})" if entered else ""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"model {name!r} (model.name) cannot take inputs of shape {shape} "
                         f"from this dataset: {reason}{at}") from error
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"model {name!r} (model.name) cannot take inputs of shape {shape} from "
                         f"this dataset: output has shape {tuple(out.shape)}, "
                         f"expected (2, {num_classes})")


def count_parameters(model: nn.Module) -> int:
    """All trainable parameters (weights, biases, BatchNorm affine), for the model-size table."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
