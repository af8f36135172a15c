"""cts-pipeline: Concrete Ticket Search (CTS-KL) lottery tickets as a Kedro project."""

__version__ = "0.1.0"
