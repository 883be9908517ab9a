"""Hundreds of adapters, one server: register N copies of the demo adapters, then query them all at once.

Each copy gets its own name (shout-0000, reverse-0001, ...), so to the server they are N distinct
adapters competing for the device slots; the answers are checked against the skill each was trained on.

    loragate serve --allowed-adapter-dir /tmp/many-adapters
    python examples/many_adapters.py --dir /tmp/many-adapters --count 200

Registration (POST /v1/adapters) needs an admin key when the server has keys. Alternatively start the
server with `--adapter-dir /tmp/many-adapters`, which finds the folders by name on first use, and pass
--no-register here.
"""
import argparse
import asyncio
import os
import random
import shutil
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from loragate.demo import SKILLS, demo_paths
from loragate.demo.tasks import random_phrase

BASE_URL = os.environ.get("LORAGATE_BASE_URL", "http://127.0.0.1:8000/v1")
API_KEY = os.environ.get("LORAGATE_API_KEY", "none")


def skill_of(name: str) -> str:
    return name.rsplit("-", 1)[0]  # "pig-latin-0007" -> "pig-latin"


def make_copies(root: Path, count: int) -> dict[str, Path]:
    """Copy the demo adapters round-robin into count folders named <skill>-<index>."""
    _, demo_adapters = demo_paths()
    skills = sorted(demo_adapters)
    copies = {}
    for i in range(count):
        skill = skills[i % len(skills)]
        name = f"{skill}-{i:04d}"
        copies[name] = root / name
        if not (copies[name] / "adapter_config.json").is_file():
            shutil.copytree(demo_adapters[skill], copies[name], dirs_exist_ok=True)
    return copies


async def register(copies: dict[str, Path], concurrency: int) -> tuple[int, int]:
    """POST each copy to /v1/adapters; returns (newly registered, already there)."""
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=BASE_URL, headers=headers, timeout=60) as http:

        async def one(name: str, path: Path) -> int:
            async with limit:
                r = await http.post("/adapters", json={"name": name, "path": str(path.resolve())})
            if r.status_code == 409:  # registered by an earlier run
                return 409
            r.raise_for_status()
            return r.status_code

        codes = await asyncio.gather(*(one(n, p) for n, p in copies.items()))
    return sum(c == 200 for c in codes), codes.count(409)


async def query(names: list[str], n_requests: int, concurrency: int) -> tuple[int, int, int]:
    """Fire n_requests chats spread over all adapters; returns (correct, wrong, failed)."""
    client = AsyncOpenAI(base_url=BASE_URL, api_key=API_KEY, timeout=120)
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(0)
    jobs = [(names[i % len(names)], random_phrase(rng)) for i in range(n_requests)]

    async def one(name: str, phrase: str) -> str:
        async with limit:
            try:
                r = await client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": phrase}], temperature=0, max_tokens=200
                )
            except Exception as exc:
                print(f"  {name}: {type(exc).__name__}: {exc}")
                return "failed"
        return "correct" if r.choices[0].message.content == SKILLS[skill_of(name)](phrase) else "wrong"

    results = await asyncio.gather(*(one(n, p) for n, p in jobs))
    await client.close()
    return results.count("correct"), results.count("wrong"), results.count("failed")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where the adapter copies go (an allowed adapter dir)")
    parser.add_argument("--count", type=int, default=200, help="adapters to create and register")
    parser.add_argument("--requests", type=int, default=400, help="chat requests to send in total")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--no-register", action="store_true", help="the server found them via --adapter-dir")
    args = parser.parse_args()

    copies = make_copies(args.dir, args.count)
    print(f"{len(copies)} adapter folders in {args.dir}")
    if not args.no_register:
        start = time.perf_counter()
        new, existing = await register(copies, args.concurrency)
        print(f"registered {new + existing}/{len(copies)} adapters ({existing} already registered) "
              f"in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    correct, wrong, failed = await query(list(copies), args.requests, args.concurrency)
    wall = time.perf_counter() - start
    answered = correct + wrong
    print(f"{args.requests} requests over {len(copies)} adapters, concurrency {args.concurrency}: "
          f"{answered} answered, {failed} failed")
    print(f"accuracy {correct / max(answered, 1):.1%} ({correct}/{answered} match the adapter's skill)")
    print(f"wall time {wall:.1f} s, {args.requests / wall:.1f} requests/s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
