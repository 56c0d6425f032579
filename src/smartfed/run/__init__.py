"""What every run shares, below the methods and the Flower apps: its configuration
(``RunConfig``), its folder (``RunFolder``: config, metrics, checkpoints, summary), derived
seeds, and where ``--lora_pool`` items point."""
