"""The example workflows, as compact specs (see author_workflows.py). Each teaches one task; the notes
in the graph say what to look at."""

WORKFLOWS = [
    {
        "name": "01_load_inspect_save",
        "nodes": [
            {"id": 1, "type": "LoadLoRAFile", "pos": (40, 120), "widgets": {"lora_name": "example.safetensors"}},
            {"id": 2, "type": "SaveLoRAFile", "pos": (420, 120), "links": {"lora": (1, "lora")},
             "widgets": {"filename_prefix": "loras/LoRA-Lens-copy", "copy_to_loras": False}},
        ],
        "notes": [("## Load, inspect, save\nPick a LoRA in **Load LoRA File**: the node shows what it is "
                   "(architecture, format, precision, rank, trigger words). **Save LoRA File** writes it to the "
                   "output folder with its metadata and a provenance entry; tick *copy_to_loras* to list it in "
                   "LoraLoader at once.", (40, 320), (560, 160))],
    },
    {
        "name": "05_ultra_compress",
        "nodes": [
            {"id": 1, "type": "LoadLoRAFile", "pos": (40, 120), "widgets": {"lora_name": "example.safetensors"}},
            {"id": 2, "type": "PruneRank", "pos": (400, 120), "links": {"lora": (1, "lora")},
             "widgets": {"method": "energy", "value": 0.99}},
            {"id": 3, "type": "QuantizeInt8", "pos": (780, 120), "links": {"lora": (2, "lora")},
             "widgets": {"format": "int8", "method": "auto", "min_snr_db": 40.0, "keep_fp16_below": False}},
            {"id": 4, "type": "SaveLoRAFile", "pos": (1160, 120), "links": {"lora": (3, "lora")},
             "widgets": {"filename_prefix": "loras/LoRA-Lens-ultra", "copy_to_loras": False}},
        ],
        "notes": [("## Ultra compress: prune, then int8\n**PruneRank** drops the dimensions each module does not "
                   "use (here: keep 99 % of every module's ΔW energy). **Quantize LoRA to int8** stores the pruned "
                   "factors as int8 with the scales folded into alpha, so stock LoraLoader applies it exactly; its "
                   "report gives the ΔW SNR (aim for 40 dB or more). Same as `lora-lens ultra IN -o OUT --recipe "
                   "energy=0.99`.", (40, 360), (620, 180))],
    },
]
