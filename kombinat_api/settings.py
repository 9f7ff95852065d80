"""Configuration from the environment (prefix ``KOMBINAT_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server; one instance is built per process and passed to ``create_app``."""

    model_config = SettingsConfigDict(env_prefix="KOMBINAT_", env_file=None, extra="ignore", env_parse_none_str="none")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/kombinat"
    # Each replica holds two pools: one for the hot path (claim, submit, release) and one for everything
    # else; the sum over replicas must stay under PostgreSQL's max_connections.
    # The hot pool is fixed-size by default: its connections carry prepared statements and their plans, and an
    # overflow connection is closed on return when the pool is full, so under load overflow meant a new
    # backend and a fresh round of planning every few requests (bench/queue.py saw ~5 new sessions a second).
    # Few connections serve best: on 2 cores, 2 workers x 4 beat 2 x 6 and 2 x 8 (bench/queue.py).
    db_pool_size: int = 8
    db_max_overflow: int = 0
    db_general_pool_size: int = 2
    db_general_max_overflow: int = 4
    # The hot path's statements are prepared once per connection and run with one generic plan (db.py says
    # why); off = plan every call afresh, as the general pool does.
    hot_path_generic_plans: bool = True
    # psycopg's prepare_threshold for the general pool: executions of a statement before it is prepared on
    # the server; none = never (the default: those statements are rare and their filters skewed).
    db_prepare_threshold: int | None = None

    # GitHub OAuth device flow. The client id of an OAuth App with device flow enabled (no secret needed).
    github_client_id: str = ""
    github_oauth_url: str = "https://github.com"
    github_api_url: str = "https://api.github.com"
    github_scope: str = "read:user"
    github_timeout_s: float = 10.0

    # Leases.
    lease_seconds: int = 900
    max_batch_size: int = 1000
    max_labels_per_chunk: int = 500

    # Verification: a pair is verified once >= 2 counted labels agree and the majority's share reaches
    # verify_min_agreement. A pair that reached max_labels_per_tier counted labels without that escalates
    # to the next model tier, up to max_tier; past it the pair is marked unresolved.
    verify_min_agreement: float = Field(default=0.66, ge=0.5, le=1.0)
    max_labels_per_tier: int = Field(default=3, ge=2)
    max_tier: int = 1
    # Independence (KOMBINAT_QUORUM_DISTINCT_MODELS): a model configuration is (model_id, quantization,
    # prompt_version), whatever the backend. Off, every counted label is a vote. On, the counted labels of one
    # configuration on a pair are one vote (their majority; a tie abstains), so copies of one deterministic model
    # can never verify a pair alone: it needs >= 2 configurations that agree. Escalation still counts labels.
    quorum_distinct_models: bool = False

    # Honeypots: share of each batch for trusted contributors (5-10 % by design) and for new or
    # low-reputation ones, who get honeypot-heavy batches until they are trusted.
    honeypot_fraction: float = Field(default=0.07, ge=0.0, le=0.5)
    honeypot_fraction_untrusted: float = Field(default=0.3, ge=0.0, le=0.9)
    # A honeypot is shown to at most this many contributors, then retired (GET /api/v1/admin/honeypots shows what
    # is left): an ordinary pair is labeled by a few contributors and never shown again, so gold shown to every
    # account would stand out to accounts that compare what they were served. The pool then serves
    # size x honeypot_max_exposure batches' worth of honeypots; load more gold before it runs out (the agreement
    # test below keeps checking everyone meanwhile).
    honeypot_max_exposure: int = Field(default=3, ge=1)
    # the honeypot accuracy a contributor must show to become trusted
    honeypot_min_accuracy: float = 0.9
    # Quarantine is a test, not a bar (queue.implausible_misses): a batch is quarantined when its contributor's
    # honeypot answers (this batch's so far, plus those of its previous quarantine_history_batches batches) make
    # an accuracy of honeypot_honest_accuracy implausible at level quarantine_alpha (one-sided binomial test).
    # An honest contributor at that accuracy loses about quarantine_alpha of its batches; docs/api.md has the rates.
    # false switches quarantine off (a demo with a model that labels near chance); the record still counts for trust
    honeypot_quarantine: bool = True
    honeypot_honest_accuracy: float = Field(default=0.9, gt=0.5, lt=1.0)
    quarantine_alpha: float = Field(default=0.005, gt=0.0, lt=0.5)
    quarantine_history_batches: int = Field(default=5, ge=0)

    # The agreement test, which goes on after the honeypots a contributor may see are spent: it loses good standing
    # (its labels stop counting) when its labels over the reputation window agree with the other counted labels
    # of their pairs so rarely (ties count one half) that an agreement rate of agreement_honest is implausible at
    # level agreement_alpha, given at least agreement_min_compared comparisons (docs/api.md has the rates).
    agreement_honest: float = Field(default=0.75, gt=0.5, lt=1.0)
    agreement_alpha: float = Field(default=0.001, gt=0.0, lt=0.5)
    agreement_min_compared: int = Field(default=30, ge=1)

    # Reputation (0..1; a newcomer with no history scores 0.8, see trust.py).
    min_reputation: float = 0.5  # below this a contributor's labels stop counting toward verification
    trust_min_honeypots: int = 20
    trust_min_reputation: float = 0.75
    # at most one routine refresh per contributor in this interval (quarantine refreshes at once regardless)
    reputation_refresh_s: float = 120.0
    # the reputation reflects the contributor's most recent batches (bounded cost per refresh)
    reputation_window_batches: int = Field(default=50, ge=1)

    # Limits.
    max_body_bytes: int = 2 * 1024 * 1024
    max_admin_body_bytes: int = 256 * 1024 * 1024
    max_page_size: int = 10_000
    default_page_size: int = 1000
    max_enqueue_pairs: int = 200_000
    rate_limit_per_minute: int = 600
    admin_rate_limit_per_minute: int = 6000
    device_rate_limit_per_minute: int = 60  # unauthenticated sign-in calls, per client address

    stats_window_hours: int = 1

    # Each server process vacuums the queue's hot tables this often (kombinat_api/upkeep.py); 0 turns it off,
    # for deployments that tune autovacuum for these tables themselves.
    upkeep_interval_s: float = Field(default=30.0, ge=0.0)
