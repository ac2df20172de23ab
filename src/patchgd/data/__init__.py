"""Data for patchgd: synthetic benchmarks, large-image readers, the CSV dataset, tissue masks.

Import from the submodules: ``ultramnist`` (the paper's synthetic benchmark), ``finedetail`` (a
detail-bound benchmark), ``sources`` (region readers: ``open_image``), ``table``
(``read_table``), ``dataset`` (``LargeImageDataset``), ``lazy`` (``LazyImage``), ``patches``
(``SourcePatches``, ``collate_lazy`` and its ``LazyBatch``), ``tissue`` (``TissueMasks``) and
``prepare`` (``prepare_images``, ``channel_stats``).
"""
