"""Plain PyTorch, no Kedro, by stage: device, artifacts, data, nets, train, then cts and prune."""
