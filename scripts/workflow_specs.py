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
                   "LoraLoader at once.", (800, 120), (480, 200))],
    },
    {
        "name": "05_ultra_compress",
        "nodes": [
            {"id": 1, "type": "LoadLoRAFile", "pos": (40, 120), "widgets": {"lora_name": "example.safetensors"}},
            {"id": 2, "type": "PruneRank", "pos": (400, 120), "links": {"lora": (1, "lora")},
             "widgets": {"method": "energy", "value": 0.99}},
            {"id": 3, "type": "QuantizeInt8", "pos": (780, 120), "links": {"lora": (2, "lora")},
             "widgets": {"format": "int8", "method": "rebalance+rotate", "min_snr_db": 40.0, "keep_fp16_below": False}},
            {"id": 4, "type": "SaveLoRAFile", "pos": (1160, 120), "links": {"lora": (3, "lora")},
             "widgets": {"filename_prefix": "loras/LoRA-Lens-ultra", "copy_to_loras": False}},
        ],
        "notes": [("## Ultra compress: prune, then int8\n**PruneRank** drops the dimensions each module does not "
                   "use (here: keep 99 % of every module's ΔW energy). **Quantize LoRA to int8** stores the pruned "
                   "factors as int8 with the scales folded into alpha, so stock LoraLoader applies it exactly; its "
                   "report gives the ΔW SNR (aim for 40 dB or more). Same as `lora-lens ultra IN -o OUT --recipe "
                   "energy=0.99`.", (1540, 120), (520, 220))],
    },
    {
        "name": "02_first_optimisation",
        "nodes": [
            {"id": 1, "type": "LoadLoRAFile", "pos": (40, 120), "widgets": {"lora_name": "example.safetensors"}},
            {"id": 2, "type": "AnalyzeLoRA", "pos": (40, 560), "size": (1100, 760), "links": {"lora": (1, "lora")}},
            {"id": 3, "type": "PruneRank", "pos": (420, 120), "links": {"lora": (1, "lora")},
             "widgets": {"method": "energy", "value": 0.99}},
            {"id": 4, "type": "SaveLoRAFile", "pos": (820, 120), "links": {"lora": (3, "lora")},
             "widgets": {"filename_prefix": "loras/LoRA-Lens-pruned", "copy_to_loras": False}},
        ],
        "notes": [("## First optimisation: analyse, prune, save\n**AnalyzeLoRA** shows the nominal and the "
                   "effective rank (the rank that holds 90/99/99.9 % of each module's ΔW energy) and the size the "
                   "file would have at the rank it really uses. **PruneRank** (energy 0.99) keeps 99 % of every "
                   "module's ΔW energy with an exact factored SVD and rescales alpha, so the result is as strong as "
                   "the original; its report lists old→new rank, bytes saved and the ΔW error per module. "
                   "**Save LoRA File** writes it next to your outputs.", (1200, 120), (420, 300))],
    },
    {
        "name": "03_analysis_dashboard",
        "nodes": [
            {"id": 1, "type": "LoadLoRAFile", "pos": (40, 120), "widgets": {"lora_name": "example.safetensors"}},
            {"id": 2, "type": "AnalyzeLoRA", "pos": (420, 60), "size": (640, 560), "links": {"lora": (1, "lora")},
             "widgets": {"block_share": 0.9}},
            {"id": 3, "type": "PreviewImage", "pos": (1100, 60), "size": (420, 420), "links": {"images": (2, "heatmap")}},
        ],
        "notes": [("## Analysis dashboard\nThe dashboard in **AnalyzeLoRA** has the summary, a sortable layer "
                   "table, the singular-value spectrum of each module, block importance bars, the weight histogram, "
                   "the similarity heatmap and a 3-D map of the modules (drag to rotate, wheel to zoom). "
                   "*llm_text* is the whole report as text: wire it into any LLM node and ask \"is it "
                   "over-trained?\". The heatmap image (blocks × spectrum) goes to PreviewImage or SaveImage.",
                   (40, 560), (360, 300))],
    },
    {
        "name": "04_compatibility_check",
        "nodes": [
            {"id": 1, "type": "LoadLoRAFile", "pos": (40, 60), "title": "LoRA A", "widgets": {"lora_name": "style_a.safetensors"}},
            {"id": 2, "type": "LoadLoRAFile", "pos": (40, 300), "title": "LoRA B", "widgets": {"lora_name": "style_b.safetensors"}},
            {"id": 3, "type": "ConflictScan", "pos": (420, 60), "size": (460, 420),
             "links": {"lora_a": (1, "lora"), "lora_b": (2, "lora")}},
            {"id": 4, "type": "BlendLoRAs", "pos": (920, 60), "size": (340, 380),
             "links": {"lora_a": (1, "lora"), "lora_b": (2, "lora"), "weight_a": (3, "ratio_a"),
                       "weight_b": (3, "ratio_b"), "exclude": (3, "problem_layers")},
             "widgets": {"method": "concat", "rank": 0}},
            {"id": 5, "type": "CheckpointLoaderSimple", "pos": (920, 500), "widgets": {"ckpt_name": "sd15_base.safetensors"}},
            {"id": 6, "type": "ApplyLoRA", "pos": (1300, 60), "links": {"model": (5, "MODEL"), "clip": (5, "CLIP"), "lora": (4, "lora")}},
            {"id": 7, "type": "CLIPTextEncode", "pos": (1640, 20), "links": {"clip": (6, "clip")},
             "widgets": {"text": "a portrait of a woman in a garden, detailed, soft light"}},
            {"id": 8, "type": "CLIPTextEncode", "pos": (1640, 260), "links": {"clip": (6, "clip")},
             "widgets": {"text": "blurry, low quality"}},
            {"id": 9, "type": "EmptyLatentImage", "pos": (1640, 500), "widgets": {"width": 512, "height": 512, "batch_size": 1}},
            {"id": 10, "type": "KSampler", "pos": (2000, 60),
             "links": {"model": (6, "model"), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)},
             "widgets": {"seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            {"id": 11, "type": "VAEDecode", "pos": (2360, 60), "links": {"samples": (10, 0), "vae": (5, "VAE")}},
            {"id": 12, "type": "PreviewImage", "pos": (2360, 200), "size": (400, 400), "links": {"images": (11, 0)}},
            {"id": 13, "type": "PreviewImage", "pos": (420, 980), "size": (400, 300), "links": {"images": (3, "conflict_map")}},
        ],
        "notes": [("## Compatibility check of two LoRAs\n**ConflictScan** compares A and B module by module from "
                   "their factors: cosine, norm ratio, subspace overlap, stacking interference; the map shows "
                   "blocks × metrics and the summary gives a conflict score, a stability prediction and a "
                   "recommended strength pair. Those ratios and the problem-layer list are wired into "
                   "**BlendLoRAs** (concat: the blend equals loading both LoRAs at those strengths). **ApplyLoRA** "
                   "patches the checkpoint with the blend so you see the result without saving it. Pick your own "
                   "SD 1.5 checkpoint and LoRAs.", (40, 560), (360, 300))],
    },
    {
        "name": "06_build_collection",
        "nodes": [
            {"id": 1, "type": "PackLoRADB", "pos": (40, 120), "size": (420, 520),
             "widgets": {"name": "my_collection", "creator": "me", "description": "character pack",
                         "tags": "character, sd15", "optimisation": "none (lossless)", "shared_basis": "off",
                         "lora_file_1": "style_a.safetensors", "lora_file_2": "style_b.safetensors",
                         "lora_file_3": "example.safetensors"}},
        ],
        "notes": [("## Build a .loradb collection\nPick LoRAs from your loras folder (or wire LoRAs from the graph "
                   "into *loras*). Lossless packing is bit-exact: every LoRA comes back byte for byte. "
                   "Choose *prune recipe* / *prune + int8* and *shared_basis auto* for much smaller collections "
                   "of related LoRAs; the report gives sizes per entry and the ΔW error of lossy entries. The file "
                   "lands in models/loradb/. Command line: `lora-lens pack -o my.loradb *.safetensors`.",
                   (500, 120), (380, 260))],
    },
    {
        "name": "07_extract_from_collection",
        "nodes": [
            {"id": 1, "type": "ExtractLoRADB", "pos": (40, 120), "size": (420, 360),
             "widgets": {"loradb": "my_collection.loradb", "entries": "all", "write_to_loras": False}},
            {"id": 2, "type": "SaveLoRAFile", "pos": (520, 120), "links": {"lora": (1, "loras")},
             "widgets": {"filename_prefix": "loras/from-collection", "copy_to_loras": False}},
        ],
        "notes": [("## Extract LoRAs from a .loradb\nThe node lists the collection's contents. *entries*: `all` "
                   "or names, one per line. Each LoRA comes out as a LORA_MODEL (a list: every node after it runs "
                   "once per LoRA) and, with *write_to_loras*, as a .safetensors in your loras folder under its "
                   "original file name. Command line: `lora-lens extract my.loradb -o DIR`.", (900, 120), (440, 220))],
    },
    {
        "name": "08_batch_optimise_folder",
        "nodes": [
            {"id": 1, "type": "LoadLoRAFile", "pos": (40, 120), "widgets": {"lora_name": "example.safetensors"}},
            {"id": 2, "type": "PruneRank", "pos": (400, 120), "links": {"lora": (1, "lora")},
             "widgets": {"method": "energy", "value": 0.99}},
            {"id": 3, "type": "SaveLoRAFile", "pos": (780, 120), "links": {"lora": (2, "lora")},
             "widgets": {"filename_prefix": "loras/optimised/lora", "copy_to_loras": False}},
        ],
        "notes": [("## Batch optimisation of a folder\nThis graph optimises one LoRA; run it over a whole folder "
                   "from a terminal, one prompt per LoRA, spread over one or more ComfyUI servers:\n\n"
                   "`lora-lens queue --server http://127.0.0.1:8188 --workflow example_workflows/api/"
                   "08_batch_optimise_folder.json --over ComfyUI/models/loras/mine --names-relative-to "
                   "ComfyUI/models/loras --set 2.value=0.995`\n\nor without a server: `lora-lens batch --workflow "
                   "... --over FOLDER -o OUT`. Both write a summary (status, output files, report per LoRA).",
                   (1160, 120), (720, 260))],
    },
]
