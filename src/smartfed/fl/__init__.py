"""SmartFed on Flower: ClientApp, ServerApp, strategy, run folders (docs/design.md §5)."""
