"""`kombinat create-local-contributor`: a contributor without GitHub, minted with database access only.

The token works for the contributor API (claim, me) and never for the admin API; names are validated; running
the command twice for one name adds a token to the same contributor, never a second person.
"""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from kombinat_api.cli import app as cli
from tests.support.kombinat_server import admit_model, bearer, model_info, running_kombinat


@pytest.mark.subprocess
def test_local_contributor_token_is_a_contributor_not_an_admin() -> None:
    runner = CliRunner()
    with running_kombinat() as server:
        admit_model(server)
        first = runner.invoke(cli, ["create-local-contributor", "demo-alice", "--json", "--database-url",
                                    server.database_url])  # fmt: skip
        assert first.exit_code == 0, first.output
        minted = json.loads(first.output)
        assert minted["login"] == "local:demo-alice" and minted["token"].startswith("kmb_")
        headers = bearer(minted["token"])

        me = httpx.get(f"{server.url}/api/v1/me", headers=headers)
        assert me.status_code == 200
        assert me.json()["login"] == "local:demo-alice" and me.json()["is_admin"] is False
        assert me.json()["contributor_id"] == minted["contributor_id"]
        claim = httpx.post(f"{server.url}/api/v1/batches/claim", headers=headers,
                           json={"size": 5, "model": model_info()})  # fmt: skip
        assert claim.status_code == 200, claim.text
        assert httpx.get(f"{server.url}/api/v1/admin/queue", headers=headers).status_code == 403

        # the same name again: a second token of the same contributor
        second = runner.invoke(cli, ["create-local-contributor", "demo-alice", "--database-url", server.database_url])
        assert second.exit_code == 0, second.output
        token = second.output.strip()
        assert token.startswith("kmb_") and token != minted["token"]
        again = httpx.get(f"{server.url}/api/v1/me", headers=bearer(token)).json()
        assert again["contributor_id"] == minted["contributor_id"]
        listed = httpx.get(f"{server.url}/api/v1/admin/contributors", headers=bearer(server.admin_token)).json()
        logins = [c["login"] for c in listed["contributors"]]
        assert logins.count("local:demo-alice") == 1


def test_local_contributor_name_is_validated() -> None:
    runner = CliRunner()
    for bad in ["Alice", "a:b", "", "a_b", "x" * 40]:
        result = runner.invoke(
            cli, ["create-local-contributor", bad, "--database-url", "postgresql+psycopg://nowhere/x"]
        )
        assert result.exit_code == 2, (bad, result.output)
        shown = " ".join(result.output.replace("│", " ").split())  # typer boxes and wraps its error message
        assert "invalid local contributor name" in shown
