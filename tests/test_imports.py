"""What a command imports: `nan-peft merge`, `inspect` and `norms` run without peft, transformers or accelerate
(seconds of start-up each; the model card's serving checks once pulled peft in through every merge). Only
folding with a device map and live merging need them."""

import subprocess
import sys

HEAVY = ("peft", "transformers", "accelerate", "gguf")


def test_merge_inspect_and_norms_import_no_model_library(llama_adapters, tmp_path):
    plain, patterns, rslora, _ = map(str, llama_adapters)
    commands = [
        ["merge", plain, patterns, rslora, "-o", str(tmp_path / "a"), "--quiet"],
        ["merge", plain, patterns, "-o", str(tmp_path / "b"), "--serve", "lorax", "--tensor-parallel", "2", "--quiet"],
        ["merge", plain, patterns, "-o", str(tmp_path / "c"), "--combine", "svd", "--rank", "4", "--method", "ties", "--density", "0.5", "--quiet"],
        ["inspect", patterns, "--json"],
        ["norms", plain, patterns, "--json"],
    ]
    code = (
        "import sys\n"
        "from nan_peft.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    sys.argv = ['nan-peft', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exit:\n"
        "        assert not exit.code, (argv, exit.code)\n"
        f"print('imported:', sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "imported: []"
