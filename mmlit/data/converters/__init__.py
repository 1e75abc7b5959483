"""Converters: the formats users bring (an image folder, a table, COCO captions, VQAv2) -> WebDataset shards with
their index (``mmlit data convert FORMAT``). Each module plans its samples; ``writer.write_split`` writes them."""

from mmlit.data.converters import coco, folder, table, vqa
from mmlit.data.converters.writer import Planned, Skipped, SplitReport, check_output, write_split

__all__ = ["CONVERTERS", "Planned", "Skipped", "SplitReport", "check_output", "write_split"]

# format -> module with add_arguments(parser) and run(args) -> [SplitReport]
CONVERTERS = {"folder": folder, "table": table, "coco": coco, "vqa": vqa}
