"""Small helpers shared by the layers."""
