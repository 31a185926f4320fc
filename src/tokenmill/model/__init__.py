"""Pure compute: model definitions, layers, attention backends, weight loading."""
