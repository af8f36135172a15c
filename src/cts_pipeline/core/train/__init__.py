"""Training: the recipe, the loop and its epochs, memory plans, and K tickets retrained as stacked rows."""
