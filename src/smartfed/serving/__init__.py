"""After a federation: load a run's routed model (``smartfed.load``), generate, and export it
as one static PEFT LoRA."""
