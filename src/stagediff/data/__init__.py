"""The organism's data: backdoor variants, the corpus and its splits, tokens and labels."""
