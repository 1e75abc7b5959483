"""Converters: the formats users bring (an image folder, a table, COCO captions, VQAv2; LibriSpeech, Clotho or
AudioCaps audio captions; MSR-VTT, a folder of captioned clips) -> WebDataset shards with their index
(``mmlit data convert FORMAT``). Each module plans its samples; ``writer.write_split`` writes them."""

from mmlit.data.converters import clotho, coco, folder, librispeech, msrvtt, table, video_folder, vqa
from mmlit.data.converters.writer import Planned, Skipped, SplitReport, check_output, write_split

__all__ = ["CONVERTERS", "Planned", "Skipped", "SplitReport", "check_output", "write_split"]

# format -> module with HELP, add_arguments(parser) and run(args) -> [SplitReport]
CONVERTERS = {"folder": folder, "table": table, "coco": coco, "vqa": vqa, "librispeech": librispeech,
              "clotho": clotho, "msrvtt": msrvtt, "video-folder": video_folder}
