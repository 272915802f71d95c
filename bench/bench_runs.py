"""What the bench scripts share: run an experiment unless its results.json exists; write tables whole; read
a keras_pcl flagfile."""

import os
import subprocess
import time

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")


def run_once(out, command, label, train=True):
    """Runs `command` (its stdout appended to `out.log`, to follow a long run) unless
    `out/results.json` exists or `train` is False; prints the command and its wall time. Returns `out`."""
    if os.path.exists(os.path.join(out, "results.json")) or not train:
        return out
    print("$", " ".join(command), flush=True)
    started = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".log", "a") as log:
        subprocess.run(command, check=True, stdout=log)
    print(f"  {label}: {time.time() - started:.0f} s wall", flush=True)
    return out


def write_atomically(path, content):
    """Writes `content` to a temporary name, then renames: a stopped run never leaves half a file.

    `content` is text, or a function that writes the file at the path it is given (torch.save,
    np.savez). The temporary name keeps the suffix, which np.savez would otherwise append.
    """
    root, suffix = os.path.splitext(path)
    temporary = f"{root}.tmp{suffix}"
    if callable(content):
        content(temporary)
    else:
        with open(temporary, "w") as f:
            f.write(content)
    os.replace(temporary, path)


def flag_values(lines):
    """`--key=value` (or absl's `-key=value`) lines as a dict of strings; later lines win, as in absl."""
    values = {}
    for line in lines:
        line = line.strip()
        if line.startswith("-"):
            key, _, value = line.lstrip("-").partition("=")
            values[key] = value
    return values


def read_flagfile(name, extra=()):
    """The flags of `experiments/configs/<name>`, then the `extra` `--key=value` overrides, as a dict."""
    with open(os.path.join(CONFIG_DIR, name)) as f:
        return flag_values(list(f) + list(extra))
