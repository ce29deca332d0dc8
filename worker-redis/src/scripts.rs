//! The Lua scripts, loaded once per process and called by SHA (redis-rs reloads a
//! script on NOSCRIPT, e.g. after a server restart).

use std::sync::LazyLock;

use redis::Script;

const PRELUDE: &str = include_str!("lua/prelude.lua");

fn queue_script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

macro_rules! scripts {
    ($($name:ident = $file:literal),* $(,)?) => {
        $(
            pub(crate) static $name: LazyLock<Script> =
                LazyLock::new(|| queue_script(include_str!(concat!("lua/", $file))));
        )*
    };
}

scripts! {
    ENQUEUE = "enqueue.lua",
    FETCH = "fetch.lua",
    ACK = "ack.lua",
    RETRY = "retry.lua",
    DEAD = "dead.lua",
    RELEASE = "release.lua",
    EXTEND = "extend.lua",
    EXTEND_ALL = "extend_all.lua",
    CHECKPOINT = "checkpoint.lua",
    REAP = "reap.lua",
    DEPTH = "depth.lua",
    DEAD_LIST = "dead_list.lua",
    DEAD_REQUEUE = "dead_requeue.lua",
    DEAD_PURGE = "dead_purge.lua",
}

pub(crate) static REGISTRY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/registry.lua")));
