"""Programs evaluated under encryption: circuits, their compilation and their execution."""
