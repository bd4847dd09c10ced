"""Instance files kept the same on every router through PostgreSQL's ``instances`` table: two
mirrors of it, each with its own directory, on a database of their own."""

from __future__ import annotations

import asyncpg

from router.shared_instances import CHANGES_KEPT_S, SharedInstances
from tests.conftest import write_instance


def names(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if not path.name.startswith("."))


async def test_each_router_takes_what_changed_whoever_wrote_it(pg_url, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    reloads = {one: 0, two: 0}

    def counting(directory):
        async def reload() -> None:
            reloads[directory] += 1

        return reload

    write_instance(one, "shop", "token: a\n")
    first, second = SharedInstances(pg_url, one, counting(one)), SharedInstances(pg_url, two, counting(two))
    conn = await asyncpg.connect(pg_url)
    try:
        await first.start()  # the table was empty: the first router's files are its content
        await second.start()
        assert names(two) == ["shop.yaml"]

        write_instance(one, "bot", "token: b\n")  # an operator's edits on the first router
        (one / "shop.yaml").unlink()
        await first.push()
        await second.pull()
        assert names(two) == ["bot.yaml"] and (two / "bot.yaml").read_text() == "token: b\n"
        assert reloads[two] == 1

        # Written by something else than this router (an older router, an operator with psql):
        # the table's trigger logs it all the same.
        await conn.execute("UPDATE instances SET yaml = 'token: c' WHERE name = 'bot.yaml'")
        await conn.execute(
            "INSERT INTO instances (name, yaml, updated_at) VALUES ('new.yaml', 'token: n', 0)"
        )
        await second.pull()
        assert names(two) == ["bot.yaml", "new.yaml"] and (two / "bot.yaml").read_text() == "token: c"
        await second.pull()  # nothing changed since: no file written, no reload
        assert reloads[two] == 2

        # The log keeps an hour of changes: older entries go with the next write.
        old = f"extract(epoch FROM clock_timestamp()) - {CHANGES_KEPT_S + 60}"
        await conn.execute(f"INSERT INTO instance_changes (name, at) VALUES ('gone.yaml', {old})")
        write_instance(two, "late", "token: l\n")
        await second.push()
        assert await conn.fetchval("SELECT count(*) FROM instance_changes WHERE name = 'gone.yaml'") == 0
        await first.pull()
        assert names(one) == ["bot.yaml", "late.yaml", "new.yaml"]
    finally:
        await conn.close()
        await first.close()
        await second.close()
