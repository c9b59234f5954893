"""Service settings: every field is an environment variable ``MEND_<NAME>`` and a ``mend serve`` flag."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["reader", "editor", "admin"]
ROLE_RANK: dict[str, int] = {"reader": 0, "editor": 1, "admin": 2}


class ApiKey(BaseModel):
    """Who holds a key (the name is what the journal records as author) and what it may do."""

    name: str = Field(min_length=1)
    role: Role


class Settings(BaseSettings):
    """All knobs of the service. Limits are enforced on every request before the model sees it."""

    model_config = SettingsConfigDict(env_prefix="MEND_", extra="ignore")

    # --- model ---------------------------------------------------------------------------------
    model: str = Field("smollm2-135m", description="model alias, HF id, local directory or GGUF file")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    model_cache: Path | None = Field(None, description="where converted GGUF models are cached (default ~/.cache/mend-service/models)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    malloc_mmap_threshold: int = Field(
        131072, ge=0, description="bytes: pin glibc's mmap threshold so the resident set does not grow with every "
        "edit (editor_core/allocator.py); 0 = glibc's dynamic default")
    editor_dir: Path | None = Field(
        None, description="trained MEND editor directory (default: the one shipped for the model, if any)"
    )
    stats_dir: Path | None = Field(
        None, description="directory with key statistics (keystats.safetensors, from `mend stats`) for rome, "
                          "memit and alphaedit (default: the one shipped for the model, if any)")
    default_method: Literal["alphaedit", "memit", "rome", "mend", "ft"] = Field(
        "memit", description="method of an /edit that names none (it must be available on the model)")

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address (forced to 127.0.0.1 when no API keys are set)")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    api_keys: dict[str, ApiKey] = Field(
        default_factory=dict,
        description='JSON {"<key>": {"name": "...", "role": "reader|editor|admin"}}; empty = no auth, local only',
    )
    log_level: str = Field("INFO", description="logging level")
    log_format: Literal["json", "text"] = Field("json", description="json (one object per line) or text")

    # --- Redis journal -------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="external Redis URL; unset = start an embedded redis-server")
    data_dir: Path = Field(Path("var"), description="embedded redis-server's directory (AOF lives here)")
    redis_prefix: str = Field("mend", description="prefix of every Redis key (then the model fingerprint)")
    lock_ttl_ms: int = Field(15000, ge=1000, description="writer lock expiry; renewed every third of it")
    lock_wait_s: float = Field(60.0, ge=0, description="how long startup waits for another writer's lock")

    # --- worker --------------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, description="most prompts in one query micro-batch")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more queries")
    query_timeout_s: float = Field(30.0, gt=0, description="a query waiting longer gets 504")
    edit_timeout_s: float = Field(300.0, gt=0, description="an edit or rollback waiting longer gets 504")

    # --- limits --------------------------------------------------------------------------------
    max_prompt_chars: int = Field(1000, ge=1, description="longest prompt, target or rephrase (characters)")
    max_requests_per_edit: int = Field(8, ge=1, description="most facts in one /edit")
    max_rephrases: int = Field(8, ge=0, description="most rephrases per edit request")
    max_prompts_per_query: int = Field(16, ge=1, description="most prompts in one /query")
    max_new_tokens: int = Field(64, ge=1, description="largest max_new_tokens a query may ask for")
    default_new_tokens: int = Field(16, ge=1, description="max_new_tokens when a query does not say")
    max_candidates: int = Field(16, ge=0, description="most candidates scored per query")
    max_body_bytes: int = Field(262144, ge=1024, description="largest request body (bytes)")
    max_page_size: int = Field(200, ge=1, description="largest page of GET /edits")
    max_update_ratio: float = Field(
        10.0, gt=0, description="refuse an edit whose update of any target has a Frobenius norm above this "
                                 "many times the weight's (an exploding edit)")
    canary_guard: bool = Field(True, description="score the canary prompts with every candidate edit applied "
                                                 "and refuse edits that change them (422)")
    canary_max_changed: float = Field(
        0.05, ge=0, le=1, description="refuse an edit that makes more than this share of the canary prompts "
                                      "answer differently (against the model just before it)")
    canary_max_logprob_drop: float = Field(
        0.25, ge=0, description="refuse an edit that takes more than this mean log-prob (nats per token) from "
                                "the canaries' unedited answers (against the model just before it)")
    canary_max_changed_total: float = Field(
        0.5, ge=0, le=1, description="refuse any edit after which more than this share of the canary prompts "
                                     "would answer differently from the unedited model (ceiling on drift that "
                                     "adds up over many edits)")

    # --- roles and replicas (see service.roles) -------------------------------------------------
    role: Literal["writer", "replica", "auto"] = Field(
        "auto", description="writer: takes the writer lock (waits lock_wait_s for it) and edits; replica: follows "
                            "the journal and answers queries, edits get 409 with the writer's URL; auto: writer "
                            "while it holds the lock, replica otherwise, takes over when the writer's lock expires")
    advertise_url: str | None = Field(
        None, description="URL at which clients reach this instance; a writer publishes it in Redis and replicas "
                          "name it in their 409 (default http://<host>:<port>)")
    min_version_wait_s: float = Field(
        5.0, ge=0, le=300, description="how long /query waits for its min_version before 503 with Retry-After")
    replica_max_lag_ops: int = Field(
        100, ge=0, description="a replica more ops behind the journal head than this says 503 on /health/ready")
    replica_max_lag_s: float = Field(
        30.0, gt=0, description="a replica behind the head (or out of touch with Redis) for longer than this says "
                                "503 on /health/ready")

    # --- journal entry size ---------------------------------------------------------------------
    max_delta_bytes: int | None = Field(
        8_000_000, ge=1, description="refuse (422) an edit whose delta serializes to more than this many bytes "
                                     "(one journal entry); empty = no bound")

    @field_validator("redis_url", "editor_dir", "stats_dir", "model_cache", "torch_threads", "advertise_url",
                     "max_delta_bytes", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @property
    def auth_enabled(self) -> bool:
        """True when at least one API key is configured."""
        return bool(self.api_keys)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
