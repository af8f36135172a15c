"""Networks: the architectures, the registry that builds them by name, and their prunable weights and masks."""
