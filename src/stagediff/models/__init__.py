"""Language models: build, save and load, context windows, Lightning training, loss and
generation (with interventions, key-value cached)."""
