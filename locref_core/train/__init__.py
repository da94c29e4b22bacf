"""Training scripts: LocRef adapter and FG-DM factor adapters on one GPU or many (torchrun)."""
