"""SmartFed on Flower: ClientApp, ServerApp, strategy, run folders (DESIGN.md §3)."""
