"""Plain PyTorch: data, models, masks, training and the Concrete Ticket Search. No Kedro here."""
