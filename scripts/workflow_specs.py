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
]
