"""Names of the metrics and of the TopoScore matchings: a leaf module, read by the config without loading a metric."""

METRIC_NAMES = ("dice", "iou", "surface_dice", "hd95", "voi_split", "voi_merge", "voi", "voi_score", "betti_error_0",
                "betti_error_1", "betti_error_2", "topo_score", "cldice", "leaderboard")
DEFAULT_METRICS = ("dice", "iou", "surface_dice", "hd95", "voi_split", "voi_merge", "topo_score", "cldice",
                   "leaderboard")
TOPO_MATCHINGS = ("exact", "persistence", "betti")  # "exact": the competition's Betti matching; the others stand-ins
