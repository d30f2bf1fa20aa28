"""[redis]: one url, a master behind Sentinel, or shards (docs/configuration.md#redis), and every mistake named."""

from __future__ import annotations

from pathlib import Path

from wsgateway.config.redis import RedisShard

from .test_config import cfg, problems


def test_one_url_is_one_shard_named_without_its_password(tmp_path: Path) -> None:
    redis = cfg(tmp_path, "[redis]\nurl = redis://:s3cret@10.0.0.9:6380/2\n").redis
    assert redis is not None and not redis.sharded
    assert redis.targets == (RedisShard(name="10.0.0.9:6380/2", url="redis://:s3cret@10.0.0.9:6380/2"),)
    assert cfg(tmp_path, "[redis]\n").redis.targets == (  # type: ignore[union-attr]
        RedisShard(name="127.0.0.1:6379/0", url="redis://127.0.0.1:6379/0"),)


def test_sentinel_keys(tmp_path: Path) -> None:
    redis = cfg(tmp_path, "[redis]\nsentinels = 10.0.0.1:26379 [::1]:26380\nsentinel_master = mymaster\n"
                          "sentinel_password = sp\npassword = p\nmin_replicas_ack = 1\n").redis
    assert redis is not None
    assert redis.sentinels == ("10.0.0.1:26379", "[::1]:26380")
    assert redis.targets == (RedisShard(name="mymaster", master="mymaster"),)
    assert (redis.sentinel_password, redis.password, redis.min_replicas_ack) == ("sp", "p", 1)
    assert "sp" not in repr(redis) and "'p'" not in repr(redis)


def test_shards_of_urls_and_of_sentinel_masters(tmp_path: Path) -> None:
    redis = cfg(tmp_path, "[redis]\nshards = redis://a:6379/0\n    redis://b:6379/0\n").redis
    assert redis is not None and redis.sharded
    assert [t.name for t in redis.targets] == ["a:6379/0", "b:6379/0"]
    redis = cfg(tmp_path, "[redis]\nsentinels = s1:26379\nshards = m1 m2 m3\n").redis
    assert redis is not None and [(t.name, t.master) for t in redis.targets] == [("m1", "m1"), ("m2", "m2"),
                                                                                  ("m3", "m3")]


def test_every_inconsistent_combination_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path, "[redis]\nurl = redis://h:1/0\nsentinels = s:26379\nsentinel_master = m\n") == [
        "[redis] sentinels: cannot be combined with url: with Sentinel the master's address is asked of the "
        "sentinels (remove url, or remove sentinels)"]
    assert problems(tmp_path, "[redis]\nsentinels = s:26379\n") == [
        "[redis] sentinel_master: required with sentinels: the name the sentinels monitor (e.g. mymaster)"]
    assert problems(tmp_path, "[redis]\nsentinel_master = m\nsentinel_password = x\n") == [
        "[redis] sentinel_master: only applies with sentinels",
        "[redis] sentinel_password: only applies with sentinels",
    ]
    assert problems(tmp_path, "[redis]\nurl = redis://h:1/0\nshards = redis://a:1/0 redis://a:1/0\n") == [
        "[redis] shards: cannot be combined with url: list every shard's url in shards",
        "[redis] shards: lists a shard twice",
    ]
    assert problems(tmp_path, "[redis]\nsentinels = s:26379\nsentinel_master = m\nshards = a b\n") == [
        "[redis] shards: cannot be combined with sentinel_master: list every master name in shards"]
    assert problems(tmp_path, "[redis]\nurl = redis://:x@h:1/0\npassword = y\n") == [
        "[redis] password: the url carries a password already: keep one of them"]
    assert problems(tmp_path, "[redis]\nsentinels = nohost 1.2.3.4:0 h:26379\nsentinel_master = m\n"
                              "min_replicas_ack = -1\nshards =\n") == [
        "[redis] sentinels: 'nohost' is not HOST:PORT (a sentinel's address, e.g. 10.0.0.1:26379)",
        "[redis] sentinels: '1.2.3.4:0' is not HOST:PORT (a sentinel's address, e.g. 10.0.0.1:26379)",
        "[redis] min_replicas_ack: must not be negative",
    ]
    assert problems(tmp_path, "[redis]\nshards = http://x redis://a:1/0\n") == [
        "[redis] shards: must be redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH"]


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    found = problems(tmp_path, "[redis]\nsentinels = s:26379\nsentinel_master = m\nsentinel_password = env:SP\n"
                               "password = env:RP\nurl = redis://h:1\n", environ={"SP": "topsecret1", "RP": "topsecret2"})
    assert found and not any("topsecret" in line for line in found)
