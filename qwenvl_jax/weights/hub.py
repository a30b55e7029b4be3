"""Hub ids (`Qwen/Qwen2.5-VL-3B-Instruct`) resolved to a local snapshot directory, as transformers does.

A name that is not an existing directory but looks like `org/name` is fetched file by file through
`huggingface_hub` (an optional dependency): config.json, then the weights in transformers' order
(weights.files), then the tokenizer / processor / generation files that exist. Everything lands in
one snapshot directory of the standard cache (`HF_HOME`, `HF_HUB_CACHE`), so `HF_HUB_OFFLINE=1`
serves it from the cache with no network, and the rest of the library reads it as a directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwenvl_jax.weights.files import BIN, BIN_INDEX, SAFE, SAFE_INDEX, SIDE_FILES, CheckpointError, read_index

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def is_hub_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve(name_or_path: str | Path, revision: str | None = None, *, adapter: bool = False) -> Path:
    """A local checkpoint (or, adapter=True, PEFT adapter) directory for a path or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        what = "adapter directory (adapter_config.json + weights)" if adapter else "directory (config.json + weights)"
        raise CheckpointError(f"{path}: a file; give the checkpoint's {what}")
    if path.exists() or not is_hub_id(str(name_or_path)):
        if revision is not None and not path.exists():
            raise CheckpointError(f"{name_or_path}: not a directory, nor a hub id (org/name) for a revision")
        return path
    return _Snapshot(str(name_or_path), revision).fetch(adapter)


class _Snapshot:
    def __init__(self, repo_id: str, revision: str | None):
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            raise CheckpointError(f"{repo_id}: no such directory; to load it as a hub id install huggingface_hub "
                                  "(pip install 'qwenvl_jax[hub]')") from None
        from huggingface_hub import constants

        self.repo_id, self.revision = repo_id, revision
        self.offline = constants.is_offline_mode()
        self.where = "the local hub cache (HF_HUB_OFFLINE=1)" if self.offline else "the hub"
        self.label = repo_id + (f"@{revision}" if revision else "")

    def get(self, filename: str, required: bool, first: bool = False) -> Path | None:
        from huggingface_hub import hf_hub_download
        try:
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        except ImportError:  # huggingface_hub < 0.23
            from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            if not required:
                return None
            if first:  # maybe a mistyped local path rather than a hub id: say both
                raise CheckpointError(f"{self.label}: no such directory, nor a hub repository with {filename} "
                                      f"in {self.where}") from None
            if isinstance(e, LocalEntryNotFoundError) and not self.offline:  # no network, not cached
                raise CheckpointError(f"{self.label}: {filename} is not in the local hub cache and could not "
                                      "be downloaded") from None
            raise CheckpointError(f"{self.label}: {filename} is not in {self.where}") from None
        except Exception as e:  # noqa: BLE001 - network, auth, unknown repo or revision: one line each
            text = str(e).strip().splitlines()
            raise CheckpointError(f"{self.label}: cannot fetch {filename} from {self.where} "
                                  f"({type(e).__name__}: {text[0] if text else ''})") from None

    def fetch(self, adapter: bool) -> Path:
        if adapter:
            root = self.get("adapter_config.json", required=True, first=True).parent
            if not any(self.get(n, required=False) for n in ADAPTER_FILES):
                raise CheckpointError(f"{self.label}: neither {' nor '.join(ADAPTER_FILES)} is in {self.where}")
            return root
        root = self.get("config.json", required=True, first=True).parent
        for single, index in ((SAFE, SAFE_INDEX), (BIN, BIN_INDEX)):
            if self.get(single, required=False):
                break
            index_file = self.get(index, required=False)
            if index_file:
                for shard in dict.fromkeys(read_index(index_file).values()):
                    self.get(shard, required=True)
                break
        else:
            raise CheckpointError(f"{self.label}: none of {SAFE}, {SAFE_INDEX}, {BIN}, {BIN_INDEX} is in {self.where}")
        for name in SIDE_FILES:
            self.get(name, required=False)
        return root
