"""Where the work runs: the device, its processes, and the ranks one device stands in for."""
