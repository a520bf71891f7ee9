"""The command-line tools: evaluations of a frozen backbone (knn, linear, attention_maps + explorer, segmentation,
copydetect, compare), figures of a run (dino_figure), a photo folder made on the spot (photo_folder) and the Hugging
Face export (export_hf). Each is `python -m minivit.tools.NAME --help`; they use the library, never the reverse."""
