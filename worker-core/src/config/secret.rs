//! Settings that carry credentials: given in a variable, or in a file a variable
//! names (`REDIS_URL` or `REDIS_URL_FILE`), as Kubernetes mounts a Secret.
//!
//! A value read from a file is read again each time it is needed (by the backends,
//! at every connect), so a rotated Secret is picked up without a restart.

use std::path::{Path, PathBuf};

use crate::error::ConfigError;

/// Where a secret setting comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Given as a value (an environment variable or code).
    Value(String),
    /// Read from this file: its contents, without surrounding whitespace.
    File {
        /// The `*_FILE` variable that named it, for errors.
        variable: String,
        /// The file.
        path: PathBuf,
    },
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Value(***)"),
            Self::File { variable, path } => f
                .debug_struct("File")
                .field("variable", variable)
                .field("path", path)
                .finish(),
        }
    }
}

impl SecretSource {
    /// The setting `name` from `var`: the value of `name`, or the contents of the file
    /// that `name_FILE` names. `None` when neither is set; an error naming the
    /// variables when both are, or when the file cannot be read or is empty.
    pub fn lookup(
        var: &dyn Fn(&str) -> Option<String>,
        name: &str,
    ) -> Result<Option<Self>, ConfigError> {
        let file_var = format!("{name}_FILE");
        let set = |n: &str| var(n).filter(|v| !v.trim().is_empty());
        match (set(name), set(&file_var)) {
            (Some(_), Some(path)) => Err(ConfigError::invalid(
                &file_var,
                path,
                format!("unset while {name} is set (both give {name})"),
            )),
            (Some(value), None) => Ok(Some(Self::Value(value))),
            (None, Some(path)) => {
                let source = Self::File {
                    variable: file_var,
                    path: PathBuf::from(path.trim()),
                };
                // Read once now: a missing or empty file fails at start, naming it.
                source.read()?;
                Ok(Some(source))
            }
            (None, None) => Ok(None),
        }
    }

    /// The value: given, or read from the file now.
    pub fn read(&self) -> Result<String, ConfigError> {
        match self {
            Self::Value(v) => Ok(v.clone()),
            Self::File { variable, path } => read_secret_file(variable, path),
        }
    }

    /// The variable it came from, or `None` for a value.
    pub fn file_variable(&self) -> Option<&str> {
        match self {
            Self::Value(_) => None,
            Self::File { variable, .. } => Some(variable),
        }
    }
}

fn read_secret_file(variable: &str, path: &Path) -> Result<String, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(
            variable,
            &shown,
            format!("the path of a readable file holding the value ({e})"),
        )
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ConfigError::invalid(
            variable,
            shown,
            "the path of a file holding the value (this one is empty)",
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(set: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| {
            set.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn a_secret_comes_from_its_variable_or_its_file_and_the_file_is_read_each_time() {
        let dir = std::env::temp_dir().join(format!("wp-secret-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("url");
        std::fs::write(&file, "redis://:first@h:6379\n").unwrap();
        let path = file.display().to_string();
        let set = [("REDIS_URL_FILE", path.as_str())];
        let source = SecretSource::lookup(&vars(&set), "REDIS_URL")
            .unwrap()
            .unwrap();
        assert_eq!(source.read().unwrap(), "redis://:first@h:6379");
        assert_eq!(source.file_variable(), Some("REDIS_URL_FILE"));
        std::fs::write(&file, "redis://:second@h:6379").unwrap();
        assert_eq!(source.read().unwrap(), "redis://:second@h:6379", "rotated");
        assert!(!format!("{source:?}").contains("second"));

        let set = [("REDIS_URL", "redis://:v@h")];
        let source = SecretSource::lookup(&vars(&set), "REDIS_URL")
            .unwrap()
            .unwrap();
        assert_eq!(source.read().unwrap(), "redis://:v@h");
        assert!(!format!("{source:?}").contains(":v@"));
        assert!(SecretSource::lookup(&vars(&[]), "REDIS_URL")
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_secret_setting_names_its_variable() {
        let both = [("AMQP_URL", "amqp://h"), ("AMQP_URL_FILE", "/x")];
        let e = SecretSource::lookup(&vars(&both), "AMQP_URL").unwrap_err();
        assert!(e.to_string().contains("AMQP_URL_FILE"), "{e}");
        let missing = [("AMQP_URL_FILE", "/nonexistent/wp-secret")];
        let e = SecretSource::lookup(&vars(&missing), "AMQP_URL").unwrap_err();
        assert!(
            e.to_string().contains("AMQP_URL_FILE") && e.to_string().contains("readable file"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("wp-secret-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let path = empty.display().to_string();
        let e = SecretSource::lookup(&vars(&[("AMQP_URL_FILE", path.as_str())]), "AMQP_URL")
            .unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
