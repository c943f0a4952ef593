"""Reading dictionaries: feature statistics, scoring, the rotation analysis, feature
cards, causal checks, detection and the report's figures."""
