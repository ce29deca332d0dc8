//! The GPUs a process may use, from the variables the NVIDIA container runtime and
//! CUDA read.

/// GPUs visible to this process: `CUDA_VISIBLE_DEVICES` if set, else
/// `NVIDIA_VISIBLE_DEVICES` (set in a pod by the NVIDIA device plugin). A
/// comma-separated list of indexes or UUIDs counts its entries; an empty value, `-1`,
/// `none` or `void` counts 0; `all` (every GPU of the node) cannot be counted from the
/// variable and gives `None`, as does neither being set.
///
/// ```
/// use worker_core::config::visible_gpus_from;
///
/// let env = |k: &str| (k == "NVIDIA_VISIBLE_DEVICES").then(|| "GPU-1a2b,GPU-3c4d".to_owned());
/// assert_eq!(visible_gpus_from(env), Some(2));
/// ```
pub fn visible_gpus_from(lookup: impl Fn(&str) -> Option<String>) -> Option<usize> {
    ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"]
        .into_iter()
        .find_map(lookup)
        .and_then(|v| count(&v))
}

/// [`visible_gpus_from`] on this process's environment.
pub fn visible_gpus() -> Option<usize> {
    visible_gpus_from(|k| std::env::var(k).ok())
}

fn count(value: &str) -> Option<usize> {
    let value = value.trim();
    match value.to_ascii_lowercase().as_str() {
        "" | "-1" | "none" | "void" => Some(0),
        "all" => None,
        _ => Some(
            value
                .split(',')
                .map(str::trim)
                .take_while(|d| !d.is_empty() && *d != "-1")
                .count(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::lookup_of as env;

    #[test]
    fn counts_lists_and_knows_the_special_values() {
        assert_eq!(visible_gpus_from(env(&[])), None);
        assert_eq!(
            visible_gpus_from(env(&[("NVIDIA_VISIBLE_DEVICES", "all")])),
            None
        );
        assert_eq!(
            visible_gpus_from(env(&[("NVIDIA_VISIBLE_DEVICES", "void")])),
            Some(0)
        );
        assert_eq!(
            visible_gpus_from(env(&[("NVIDIA_VISIBLE_DEVICES", "0,1,2")])),
            Some(3)
        );
        assert_eq!(
            visible_gpus_from(env(&[("CUDA_VISIBLE_DEVICES", "")])),
            Some(0)
        );
        // CUDA stops at the first invalid index.
        assert_eq!(
            visible_gpus_from(env(&[("CUDA_VISIBLE_DEVICES", "0,-1,1")])),
            Some(1)
        );
        // CUDA_VISIBLE_DEVICES narrows what the container runtime exposed.
        assert_eq!(
            visible_gpus_from(env(&[
                ("NVIDIA_VISIBLE_DEVICES", "all"),
                ("CUDA_VISIBLE_DEVICES", "1")
            ])),
            Some(1)
        );
    }
}
