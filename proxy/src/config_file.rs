//! `--config-file`: the proxy's flags from a file, one `KEY=VALUE` per line — the same file a
//! systemd unit reads with `EnvironmentFile=` (keys as environment names, `MESH_APP_PORT=8080`)
//! or keys as flag names (`app-port = 8080`). Flags on the command line win, then the
//! environment, then the file.

use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigFileError {
    #[error("{path}: {e}")]
    Read { path: String, e: String },
    #[error("{path}:{line}: expected KEY=VALUE, got {text:?}")]
    Syntax {
        path: String,
        line: usize,
        text: String,
    },
}

/// The flag a file key stands for: `MESH_APP_PORT` and `app-port` are both `app-port`.
fn flag_of(key: &str) -> String {
    key.trim()
        .strip_prefix("MESH_")
        .unwrap_or(key.trim())
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// The environment variable of a flag, by the proxy's naming rule.
pub(crate) fn env_of(flag: &str) -> String {
    format!("MESH_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// Parses the file's text into (flag, value) pairs.
pub fn parse(path: &str, text: &str) -> Result<Vec<(String, String)>, ConfigFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(ConfigFileError::Syntax {
                path: path.into(),
                line: i + 1,
                text: raw.into(),
            });
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        let flag = flag_of(k);
        if flag.is_empty() || !flag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ConfigFileError::Syntax {
                path: path.into(),
                line: i + 1,
                text: raw.into(),
            });
        }
        out.push((flag, v.to_string()));
    }
    Ok(out)
}

/// The command line with the file's settings put in front: those whose flag is on the command
/// line, or whose environment variable is set, are left out. `env` reads the environment.
pub fn merge(
    args: Vec<OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let flag_name = |a: &OsString| {
        let s = a.to_str()?.strip_prefix("--")?;
        Some(s.split_once('=').map_or(s, |(n, _)| n).to_string())
    };
    let mut path: Option<PathBuf> = env("MESH_CONFIG_FILE").map(PathBuf::from);
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match (flag_name(a).as_deref(), a.to_str()) {
            (Some("config-file"), Some(s)) if s.contains('=') => {
                path = s.split_once('=').map(|(_, p)| PathBuf::from(p));
            }
            (Some("config-file"), _) => path = it.next().map(PathBuf::from),
            _ => {}
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigFileError::Read {
        path: shown.clone(),
        e: e.to_string(),
    })?;
    let given: Vec<String> = args.iter().filter_map(flag_name).collect();
    let mut out = Vec::with_capacity(args.len() + 16);
    out.extend(args.first().cloned());
    for (flag, value) in parse(&shown, &text)? {
        if given.contains(&flag) || env(&env_of(&flag)).is_some() || flag == "config-file" {
            continue;
        }
        out.push(format!("--{flag}={value}").into());
    }
    out.extend(args.into_iter().skip(1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_settings_come_before_the_command_line_and_yield_to_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("proxy.env");
        std::fs::write(
            &f,
            "# a comment\nMESH_SERVICE=catalog\nMESH_APP_PORT = 8080\nexport MESH_NAMESPACE=\"shop\"\nservice-version=v2\nMESH_TRUST_DOMAIN=file.local\n\n",
        )
        .unwrap();
        let env = |k: &str| (k == "MESH_TRUST_DOMAIN").then(|| OsString::from("env.local"));
        let args = os(&[
            "mesh-proxy",
            "--config-file",
            f.to_str().unwrap(),
            "--app-port",
            "9090",
        ]);
        let merged = merge(args, env).unwrap();
        let merged: Vec<&str> = merged.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            merged,
            [
                "mesh-proxy",
                "--service=catalog",
                "--namespace=shop",
                "--service-version=v2",
                "--config-file",
                f.to_str().unwrap(),
                "--app-port",
                "9090",
            ]
        );
        // Without --config-file: unchanged.
        let plain = os(&["mesh-proxy", "--service", "x"]);
        assert_eq!(merge(plain.clone(), |_| None).unwrap(), plain);
        // From the environment, with the = form.
        let via_env = merge(os(&["mesh-proxy"]), |k| {
            (k == "MESH_CONFIG_FILE").then(|| f.clone().into_os_string())
        })
        .unwrap();
        assert!(via_env.contains(&OsString::from("--trust-domain=file.local")));
    }

    #[test]
    fn bad_files_are_reported_with_their_line() {
        assert_eq!(
            parse("p", "MESH_A=1\nnot a setting\n"),
            Err(ConfigFileError::Syntax {
                path: "p".into(),
                line: 2,
                text: "not a setting".into()
            })
        );
        assert!(matches!(
            merge(os(&["x", "--config-file=/nonexistent/file"]), |_| None),
            Err(ConfigFileError::Read { .. })
        ));
    }
}
