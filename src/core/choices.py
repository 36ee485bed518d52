"""The names command-line flags choose from: plain tuples, importable without torch, pandas or geopandas, so
that a command's parser (and its --help) starts instantly. The modules that implement each choice import
their names from here."""

ENGINES = ("auto", "torch", "onnx")  # src.inference.engine
PREDICT_RULES = ("mean", "median", "mode")  # src.model.heads
FUSIONS = ("concat", "mean", "attention")  # src.model.heads
CELL_KINDS = ("grid", "adaptive")  # src.data.cells
CENTROID_KINDS = ("weighted", "clipped", "plain")  # src.data.cells
SPLITS = ("train", "val", "test")  # src.data.enrich
SPLIT_BY = ("location", "cell")  # src.data.enrich
REFINE_METHODS = ("none", "knn")  # src.inference.retrieval
# the backbone registry's names (src.model.backbones registers one builder each; a test keeps them equal)
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnext101_32x8d",
             "resnext50_32x4d", "tiny")
