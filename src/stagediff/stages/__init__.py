"""The pipeline's stages: one module per `dvc.yaml` stage and CLI command, each a thin
`run(cfg, ...)` over the library. No stage imports another stage."""
