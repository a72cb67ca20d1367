"""The `hub` source: adapters in Hugging Face Hub model repos, fetched with huggingface_hub.

An id is `org/name` (the ref's revision is a branch, tag or commit). The version is the commit sha the
revision resolves to, so a push to a branch gives a new identity. Online, only the adapter files are
downloaded (`allow_patterns`), straight into the disk store's temp folder. Offline (`hub_offline`, or
HF_HUB_OFFLINE), an adapter is served from the huggingface_hub cache in place, never the network.

The token is the request's own, else the server's (`hub_token`), else what huggingface_hub finds
(HF_TOKEN, the token saved under HF_HOME). The Hub answers 401 both for a private repo without access
and for a missing repo when no token is sent, so that case is reported as access denied.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from loraplex.adapters.ref import AdapterRef
from loraplex.adapters.sources import Resolved, fetch_error_detail
from loraplex.config import AdapterSourceConfig
from loraplex.lora.adapter import (
    BIN_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    AdapterAccessDenied,
    AdapterError,
    AdapterFetchError,
    AdapterNotFound,
)
from loraplex.lora.medusa import MEDUSA_FILES

ADAPTER_FILES = [CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE, *MEDUSA_FILES]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class _Silent(tqdm):  # type: ignore[misc]
    """Progress bars off for this source only (huggingface_hub's switch is process-wide)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class HubSource:
    def __init__(self, config: AdapterSourceConfig) -> None:
        self.token = config.hub_token
        self.endpoint = config.hub_endpoint
        self.cache_dir = config.hub_cache_dir
        self.offline = config.hub_offline

    def is_offline(self) -> bool:
        return constants.is_offline_mode() if self.offline is None else self.offline

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        try:
            validate_repo_id(ref.id)
        except HFValidationError as e:
            raise AdapterNotFound(f"adapter {ref}: not a hub repo id ({e})") from None
        pinned = ref.revision is not None and _COMMIT.fullmatch(ref.revision) is not None
        if self.is_offline():
            with _hub_errors(ref, offline=True):
                folder = Path(snapshot_download(ref.id, revision=ref.revision, cache_dir=self.cache_dir,
                                                local_files_only=True, allow_patterns=ADAPTER_FILES,
                                                tqdm_class=_Silent))
            return Resolved(version=folder.name, path=folder, ttl_s=math.inf if pinned else None)
        if pinned:
            assert ref.revision is not None
            return Resolved(version=ref.revision, ttl_s=math.inf)
        with _hub_errors(ref, offline=False):
            info = HfApi(endpoint=self.endpoint).model_info(ref.id, revision=ref.revision,
                                                             token=token or self.token)
        if not info.sha:
            raise AdapterFetchError(f"adapter {ref}: the hub at {self._endpoint()} did not say which commit "
                                    f"the revision is")
        return Resolved(version=info.sha)

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        with _hub_errors(ref, offline=False):
            # revision=sha: the files of exactly the resolved commit, whatever the branch does meanwhile.
            snapshot_download(ref.id, revision=resolved.version, local_dir=dest, allow_patterns=ADAPTER_FILES,
                              endpoint=self.endpoint, token=token or self.token, max_workers=2,
                              tqdm_class=_Silent)
        shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping

    def _endpoint(self) -> str:
        return self.endpoint or constants.ENDPOINT


@contextmanager
def _hub_errors(ref: AdapterRef, offline: bool) -> Iterator[None]:
    """huggingface_hub's exceptions → the AdapterError family, naming the adapter (never the token)."""
    try:
        yield
    except AdapterError:
        raise
    except GatedRepoError as e:
        raise AdapterAccessDenied(f"adapter {ref}: the hub repo is gated and the token given (if any) "
                                  f"has not been granted access") from e
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise AdapterAccessDenied(f"adapter {ref}: the hub refused access (HTTP {status}); the repo is "
                                      f"private and needs a token that can read it, or does not exist") from e
        if isinstance(e, RevisionNotFoundError):
            raise AdapterNotFound(f"adapter {ref}: the hub repo has no revision {ref.revision!r}") from e
        if isinstance(e, RemoteEntryNotFoundError):
            raise AdapterNotFound(f"adapter {ref}: a file of the adapter is missing from the hub repo") from e
        if isinstance(e, RepositoryNotFoundError):
            raise AdapterNotFound(f"adapter {ref}: no such repo on the hub (HTTP {status})") from e
        raise AdapterFetchError(f"adapter {ref}: the hub answered HTTP {status}: {_first_line(e)}") from e
    except LocalEntryNotFoundError as e:
        if offline:
            raise AdapterNotFound(f"adapter {ref}: not in the huggingface_hub cache, and hub access is "
                                  f"offline") from e
        raise AdapterFetchError(f"adapter {ref}: the hub could not be reached: {_first_line(e)}") from e
    except (httpx2.HTTPError, OSError) as e:
        raise AdapterFetchError(f"adapter {ref}: fetching from the hub failed: {fetch_error_detail(e)}") from e


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
