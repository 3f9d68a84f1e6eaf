//! The shim's own configuration: a TOML file named by the runtime options containerd passes
//! with CreateTask (`ConfigPath`), else `/etc/tandem/tandem.toml` when it exists, else the
//! defaults. Unknown keys are rejected so that a typo does not silently fall back.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file read when the runtime options name none.
pub const DEFAULT_PATH: &str = "/etc/tandem/tandem.toml";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
}

/// How the pod's containers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Namespaced Linux containers on the host (the oci engine).
    Container,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Container => f.write_str("container"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_mode")]
    pub mode: Mode,
}

fn default_mode() -> Mode {
    Mode::Container
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: default_mode(),
        }
    }
}

impl Config {
    /// Parse TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            msg: e.message().to_string()
                + &e.span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default(),
        })
    }

    /// Read `path` (which must exist), or the default file when it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        Self::load_with_default(path, Path::new(DEFAULT_PATH))
    }

    fn load_with_default(path: Option<&Path>, default: &Path) -> Result<Config, Error> {
        let path = match path {
            Some(p) => p,
            None if default.exists() => default,
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.mode, Mode::Container);
    }

    #[test]
    fn mode_container() {
        let c = Config::parse("mode = \"container\"\n", Path::new("t.toml")).unwrap();
        assert_eq!(c.mode, Mode::Container);
    }

    #[test]
    fn unknown_mode_names_value_and_file() {
        let e = Config::parse("mode = \"vmx\"\n", Path::new("/x/t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/t.toml"), "{e}");
        assert!(e.contains("vmx"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = Config::parse("mode = \"container\"\nfoo = 1\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("foo"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn load_order() {
        let dir = tempfile::tempdir().unwrap();
        let missing_default = dir.path().join("none.toml");
        // no path, no default file: defaults
        assert_eq!(
            Config::load_with_default(None, &missing_default).unwrap(),
            Config::default()
        );
        // default file exists and is read
        let def = dir.path().join("default.toml");
        std::fs::write(&def, "bogus = true\n").unwrap();
        assert!(Config::load_with_default(None, &def).is_err());
        // an explicit path wins and must exist
        let p = dir.path().join("given.toml");
        std::fs::write(&p, "mode = \"container\"\n").unwrap();
        assert_eq!(
            Config::load_with_default(Some(&p), &def).unwrap().mode,
            Mode::Container
        );
        let e = Config::load_with_default(Some(&dir.path().join("nope.toml")), &def)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }
}
