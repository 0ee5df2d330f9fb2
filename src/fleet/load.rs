//! From fleet.yaml text to a validated, defaults-merged [`Fleet`], collecting
//! every problem with its location. `parse_fleet` is pure (the file's text and
//! the environment it depends on come in as arguments, the user database as
//! [`Accounts`]); `load` is the thin shell that reads them. Must not resolve
//! secrets or touch processes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::accounts::Accounts;
use super::admin;
use super::alerts;
use super::error::{ConfigError, ConfigErrors};
use super::metering;
use super::model::{
    AgentSpec, Fleet, ProviderSpec, RestartPolicy, RestartSpec, RotationPolicy, StopSpec,
    VaultConfig,
};
use super::node::{self, At, Node, NodeError, Pos, Value};
use super::schema::{
    Argv, Backend, Dur, Policy, RawAdmin, RawAgent, RawAlerts, RawBudget, RawDefaults, RawEnv,
    RawOverlay, RawProxy, RawRestart, RawSecretPolicy, RawSecretRef, RawStop, RawVault,
};
use crate::vault::SecretName;

/// The only fleet.yaml version this supervisor reads.
pub const VERSION: u32 = 1;

/// Larger than any hand-written fleet; refusing bigger files bounds memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Top-level sections, in the order the unknown-field message lists them.
/// A later issue adds a section here and a struct in `schema`.
const SECTIONS: &[&str] = &[
    "version",
    "state_dir",
    "vault",
    "proxy",
    "admin",
    "alerts",
    "providers",
    "defaults",
    "agents",
];

/// Set by the child environment builder; agents may not declare it themselves.
const RESERVED_ENV: &[&str] = &["SUPERVISOR_AGENT"];

/// What `load` reads from the process environment, passed in so parsing stays pure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadEnv {
    /// systemd's `$STATE_DIRECTORY` (first entry), the default `state_dir`.
    pub state_directory: Option<PathBuf>,
    /// Where `user:`/`group:` are looked up.
    pub accounts: Accounts,
}

impl LoadEnv {
    pub fn from_process() -> Self {
        let state_directory = std::env::var_os("STATE_DIRECTORY").and_then(|v| {
            // systemd joins several `StateDirectory=` entries with `:`.
            let first = v
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            (!first.is_empty()).then(|| PathBuf::from(first))
        });
        Self {
            state_directory,
            accounts: Accounts::System,
        }
    }
}

/// Where things were written in the file, for errors found after loading
/// (e.g. a secret that does not resolve).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMap {
    agents: BTreeMap<String, Pos>,
    secrets: BTreeMap<(String, String), Pos>,
    llm_keys: BTreeMap<String, Vec<Pos>>,
    run_as: BTreeMap<String, Pos>,
}

impl SourceMap {
    /// Where the agent's name is written.
    pub fn agent(&self, agent: &str) -> Option<Pos> {
        self.agents.get(agent).copied()
    }

    /// Where the secret name for `env_var` is written in the agent's `secrets:`.
    pub fn secret(&self, agent: &str, env_var: &str) -> Option<Pos> {
        self.secrets
            .get(&(agent.to_owned(), env_var.to_owned()))
            .copied()
    }

    /// Where the `user:` (else `group:`) that applies to the agent is written,
    /// in the agent or in `defaults`.
    pub fn run_as(&self, agent: &str) -> Option<Pos> {
        self.run_as.get(agent).copied()
    }

    /// Where the key of the agent's `llm[index]` entry is written.
    pub fn llm_key(&self, agent: &str, index: usize) -> Option<Pos> {
        self.llm_keys.get(agent)?.get(index).copied()
    }
}

/// A loaded fleet with the source locations of what it names.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub fleet: Fleet,
    pub sources: SourceMap,
    /// Problems that do not make the fleet invalid (e.g. the budget overlay
    /// names an agent the fleet no longer has).
    pub warnings: Vec<ConfigError>,
}

/// The budget overlay beside a fleet file, written by `supervisor tune
/// --apply`: `<stem>.budgets.yaml`, so `fleet.yaml` has `fleet.budgets.yaml`.
pub fn overlay_path(fleet_file: &Path) -> PathBuf {
    let stem = fleet_file
        .file_stem()
        .map_or_else(|| "fleet".into(), |s| s.to_string_lossy().into_owned());
    fleet_file.with_file_name(format!("{stem}.budgets.yaml"))
}

/// The overlay's text, or `None` when there is no overlay file.
fn read_overlay(fleet_file: &Path) -> Result<Option<(PathBuf, String)>, ConfigErrors> {
    let path = overlay_path(fleet_file);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => read_source(&path).map(|text| Some((path, text))),
    }
}

/// Reads, parses and validates the fleet file at `path`. Every problem is
/// collected; the file name in errors is `path` as given.
pub fn load(path: &Path) -> Result<Fleet, ConfigErrors> {
    load_located(path).map(|located| located.fleet)
}

/// [`load`], keeping the source locations (for `check`'s secret errors).
///
/// The budget overlay beside it ([`overlay_path`]), when there is one, is
/// merged under the agents' own budgets; its warnings are logged and kept in
/// [`Located::warnings`].
pub fn load_located(path: &Path) -> Result<Located, ConfigErrors> {
    let overlay = read_overlay(path)?;
    load_with_overlay(
        path,
        overlay.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
    )
}

/// Whether the fleet at `path` loads with `overlay_text` as its budget
/// overlay, before that text is written (`tune --apply`).
pub fn check_overlay_text(path: &Path, overlay_text: &str) -> Result<Located, ConfigErrors> {
    let overlay = overlay_path(path);
    load_with_overlay(path, Some((&overlay, overlay_text)))
}

fn load_with_overlay(path: &Path, overlay: Option<(&Path, &str)>) -> Result<Located, ConfigErrors> {
    let source = read_source(path)?;
    let base_dir = fleet_dir(path).map_err(|e| ConfigErrors::unreadable(path, e))?;
    let located =
        parse_fleet_with_overlay(path, &base_dir, &source, overlay, &LoadEnv::from_process())?;
    for warning in &located.warnings {
        tracing::warn!("{warning}");
    }
    Ok(located)
}

/// The directory holding the fleet file, absolute so that a later change of
/// working directory cannot move the agents' `cwd`.
fn fleet_dir(path: &Path) -> std::io::Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::path::absolute(parent)
}

/// Reads at most `limit + 1` bytes of `path` if it is a regular file (a
/// symlink to one is fine), so a caller can tell "too large" from "fits".
/// Opened with `O_NONBLOCK` and checked with `fstat` before any read: a FIFO,
/// a socket or a device put in place of a config file fails at once instead
/// of blocking the reader (a reload, the CLI) forever.
pub fn read_regular_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    let not = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {what}, not a regular file"),
        )
    };
    if kind.is_dir() {
        return Err(std::io::Error::from(std::io::ErrorKind::IsADirectory));
    }
    if kind.is_fifo() {
        return Err(not("a FIFO (named pipe)"));
    }
    if kind.is_socket() {
        return Err(not("a socket"));
    }
    if kind.is_char_device() || kind.is_block_device() {
        return Err(not("a device"));
    }
    if !kind.is_file() {
        return Err(not("neither a file nor a folder"));
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_source(path: &Path) -> Result<String, ConfigErrors> {
    let unreadable = |e| ConfigErrors::unreadable(path, e);
    let bytes = read_regular_file(path, MAX_FILE_BYTES).map_err(unreadable)?;
    let at = |pos: Pos, message: String| {
        ConfigErrors::invalid(path, vec![error_at(path, pos, None, message)])
    };
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(at(
            Pos::new(1, 1),
            format!(
                "the file is larger than {} KiB; a fleet file is never this big",
                MAX_FILE_BYTES / 1024
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let valid = String::from_utf8_lossy(valid);
        let line = valid.matches('\n').count() + 1;
        let column = valid.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        at(
            Pos::new(clamp(line), clamp(column)),
            "the file is not UTF-8 text; save it as UTF-8".to_owned(),
        )
    })
}

fn clamp(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn error_at(file: &Path, pos: Pos, agent: Option<&str>, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line: pos.line,
        column: pos.column,
        agent: agent.map(str::to_owned),
        message,
    }
}

/// Parses and validates fleet.yaml text. `file` is used in messages only;
/// relative paths resolve against `base_dir`.
pub fn parse_fleet(
    file: &Path,
    base_dir: &Path,
    source: &str,
    env: &LoadEnv,
) -> Result<Located, ConfigErrors> {
    parse_fleet_with_overlay(file, base_dir, source, None, env)
}

/// [`parse_fleet`] with a budget overlay: `(its file name for messages, its text)`.
pub fn parse_fleet_with_overlay(
    file: &Path,
    base_dir: &Path,
    source: &str,
    overlay: Option<(&Path, &str)>,
    env: &LoadEnv,
) -> Result<Located, ConfigErrors> {
    let mut root = node::parse(source).map_err(|e| {
        ConfigErrors::invalid(
            file,
            vec![error_at(
                file,
                e.pos,
                None,
                format!("invalid YAML: {}", e.message),
            )],
        )
    })?;
    let mut cx = Cx {
        file,
        overlay: overlay.map(|(path, _)| path),
        errors: Vec::new(),
    };
    for dup in node::dedup_keys(&mut root) {
        cx.duplicate(&dup);
    }
    let budgets = match overlay {
        Some((_, text)) => parse_overlay(&mut cx, text),
        None => BTreeMap::new(),
    };
    let fleet = build(&mut cx, &root, base_dir, env, &budgets);
    match fleet {
        Some(mut located) if cx.errors.is_empty() => {
            if let Some((overlay_file, _)) = overlay {
                for (name, (pos, _)) in &budgets {
                    if !located.sources.agents.contains_key(name) {
                        located.warnings.push(error_at(
                            overlay_file,
                            *pos,
                            Some(name),
                            format!(
                                "not an agent of `{}`; its budget here is ignored (`supervisor tune --apply` rewrites this file without it)",
                                file.display()
                            ),
                        ));
                    }
                }
            }
            Ok(located)
        }
        _ => Err(ConfigErrors::invalid(file, cx.errors)),
    }
}

/// The overlay's budgets by agent name, with where each name is written.
/// Its problems are errors located in the overlay file.
fn parse_overlay(cx: &mut Cx, text: &str) -> BTreeMap<String, (Pos, RawBudget)> {
    let mut root = match node::parse(text) {
        Ok(root) => root,
        Err(e) => {
            cx.push_from(true, e.pos, None, format!("invalid YAML: {}", e.message));
            return BTreeMap::new();
        }
    };
    for dup in node::dedup_keys(&mut root) {
        let key = dup
            .path
            .iter()
            .map(String::as_str)
            .chain([dup.key.as_str()])
            .collect::<Vec<_>>()
            .join(".");
        cx.push_from(
            true,
            dup.pos,
            None,
            format!(
                "duplicate key `{key}`, first defined at line {}",
                dup.first.line
            ),
        );
    }
    if matches!(root.value, Value::Null) {
        return BTreeMap::new();
    }
    if !matches!(root.value, Value::Map(_)) {
        cx.push_from(
            true,
            root.pos,
            None,
            format!(
                "expected a mapping like `agents: {{ name: {{ budget: {{...}} }} }}`, found {}",
                root.kind_name()
            ),
        );
        return BTreeMap::new();
    }
    let raw = match node::from_node_all::<RawOverlay>(&root) {
        Ok(raw) => raw,
        Err(partial) => {
            for err in &partial.errors {
                cx.push_from(true, err.pos.unwrap_or(root.pos), None, err.describe());
            }
            partial.rest.unwrap_or_default()
        }
    };
    raw.agents
        .into_iter()
        .flatten()
        .map(|(name, agent)| {
            (
                name.value,
                (name.pos, agent.value.budget.unwrap_or_default()),
            )
        })
        .collect()
}

/// Collects errors while the fleet is built.
pub(super) struct Cx<'a> {
    file: &'a Path,
    /// The budget overlay's file, for problems with values read from it.
    overlay: Option<&'a Path>,
    errors: Vec<ConfigError>,
}

impl Cx<'_> {
    pub(super) fn push(&mut self, pos: Pos, agent: Option<&str>, message: impl Into<String>) {
        self.errors
            .push(error_at(self.file, pos, agent, message.into()));
    }

    /// [`push`](Self::push), located in the overlay file when `from_overlay`.
    pub(super) fn push_from(
        &mut self,
        from_overlay: bool,
        pos: Pos,
        agent: Option<&str>,
        message: impl Into<String>,
    ) {
        let file = match (from_overlay, self.overlay) {
            (true, Some(overlay)) => overlay,
            _ => self.file,
        };
        self.errors.push(error_at(file, pos, agent, message.into()));
    }

    /// A deserialization error under `section` (e.g. `vault`, or `None` for an
    /// agent's own fields).
    fn node_error(
        &mut self,
        err: &NodeError,
        pos: Pos,
        agent: Option<&str>,
        section: Option<&str>,
    ) {
        let path = err.path();
        let message = match (section, path.is_empty()) {
            (Some(s), true) => format!("`{s}`: {}", err.message),
            (Some(s), false) => format!("`{s}.{path}`: {}", err.message),
            (None, _) => err.describe(),
        };
        self.push(pos, agent, message);
    }

    fn duplicate(&mut self, dup: &node::DuplicateKey) {
        let path: Vec<&str> = dup.path.iter().map(String::as_str).collect();
        let first = dup.first.line;
        match path.as_slice() {
            ["agents"] => self.push(
                dup.pos,
                Some(&dup.key),
                format!("duplicate agent name, first defined at line {first}; agent names must be unique"),
            ),
            ["agents", agent, rest @ ..] => {
                let key = rest.iter().copied().chain([dup.key.as_str()]).collect::<Vec<_>>().join(".");
                self.push(
                    dup.pos,
                    Some(agent),
                    format!("duplicate key `{key}`, first defined at line {first}"),
                );
            }
            _ => {
                let key = path.iter().copied().chain([dup.key.as_str()]).collect::<Vec<_>>().join(".");
                self.push(dup.pos, None, format!("duplicate key `{key}`, first defined at line {first}"));
            }
        }
    }
}

/// Deserializes an optional section, reporting every broken field in it.
fn section<T: serde::de::DeserializeOwned>(cx: &mut Cx, name: &str, node: &Node) -> Option<T> {
    if matches!(node.value, Value::Null) {
        return None;
    }
    match node::from_node_all::<T>(node) {
        Ok(value) => Some(value),
        Err(partial) => {
            for err in &partial.errors {
                cx.node_error(err, err.pos.unwrap_or(node.pos), None, Some(name));
            }
            partial.rest
        }
    }
}

fn build(
    cx: &mut Cx,
    root: &Node,
    base_dir: &Path,
    env: &LoadEnv,
    overlay: &BTreeMap<String, (Pos, RawBudget)>,
) -> Option<Located> {
    let entries = match &root.value {
        Value::Map(entries) => entries,
        Value::Null => {
            cx.push(
                root.pos,
                None,
                "the file is empty; expected a mapping with `version` and `agents`",
            );
            return None;
        }
        _ => {
            cx.push(
                root.pos,
                None,
                format!(
                    "expected a mapping with `version` and `agents` at the top level, found {}",
                    root.kind_name()
                ),
            );
            return None;
        }
    };

    let mut version = None;
    let mut state_dir: Option<At<String>> = None;
    let mut vault: Option<RawVault> = None;
    let mut vault_ok = true;
    let mut defaults = RawDefaults::default();
    let mut defaults_ok = true;
    let mut agents: Option<&Node> = None;
    let mut proxy: Option<RawProxy> = None;
    let mut admin_raw: Option<RawAdmin> = None;
    let mut admin_written = false;
    let mut alerts_raw: Option<RawAlerts> = None;
    let mut providers_raw = BTreeMap::new();
    let mut providers_ok = true;

    for (key, value) in entries {
        match key.as_text().unwrap_or_default() {
            "version" => match node::from_node::<u32>(value) {
                Ok(VERSION) => version = Some(VERSION),
                Ok(other) => cx.push(
                    value.pos,
                    None,
                    format!(
                        "unsupported `version` {other}; this supervisor reads version {VERSION}"
                    ),
                ),
                Err(err) => {
                    cx.node_error(&err, err.pos.unwrap_or(value.pos), None, Some("version"))
                }
            },
            "state_dir" => state_dir = section(cx, "state_dir", value),
            "vault" => {
                let before = cx.errors.len();
                vault = section(cx, "vault", value);
                vault_ok = cx.errors.len() == before;
            }
            "defaults" => {
                let before = cx.errors.len();
                defaults = section::<RawDefaults>(cx, "defaults", value).unwrap_or_default();
                defaults_ok = cx.errors.len() == before;
            }
            "agents" => agents = Some(value),
            "proxy" => proxy = section(cx, "proxy", value),
            "admin" => {
                admin_written = true;
                admin_raw = section(cx, "admin", value);
            }
            // Checked before serde sees it: serde's message would quote the
            // string, and a string here is likely the webhook URL, a credential.
            "alerts" if matches!(value.value, Value::Scalar { .. }) => cx.push(
                value.pos,
                None,
                format!(
                    "`alerts`: expected a mapping like `{{ webhook: https://..., command: [...] }}`, found {}",
                    value.kind_name()
                ),
            ),
            "alerts" => alerts_raw = section(cx, "alerts", value),
            "providers" => {
                let before = cx.errors.len();
                providers_raw = section(cx, "providers", value).unwrap_or_default();
                providers_ok = cx.errors.len() == before;
            }
            other => {
                let expected = SECTIONS
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let shown = if key.as_text().is_some() { other } else { "?" };
                cx.push(
                    key.pos,
                    None,
                    format!("unknown field `{shown}`, expected one of {expected}"),
                );
            }
        }
    }
    let has = |name: &str| entries.iter().any(|(k, _)| k.as_text() == Some(name));
    if !has("version") {
        cx.push(
            root.pos,
            None,
            format!("missing field `version`; add `version: {VERSION}` at the top"),
        );
    }
    if !has("agents") {
        cx.push(root.pos, None, "missing field `agents`");
    }

    let state_dir = resolve_state_dir(cx, state_dir, base_dir, env);
    let vault = if vault_ok {
        resolve_vault(cx, vault, base_dir)
    } else {
        None
    };
    check_defaults(cx, &defaults);
    let proxy = metering::resolve_proxy(cx, proxy);
    let admin = admin::resolve_admin(cx, admin_written, admin_raw);
    let providers = metering::resolve_providers(cx, providers_raw);
    let alerts = alerts::resolve_alerts(cx, alerts_raw, base_dir);

    let mut sources = SourceMap::default();
    let mut rotation_at = BTreeMap::new();
    let mut specs = BTreeMap::new();
    let mut agents_ok = true;
    if let Some(agents_node) = agents {
        match &agents_node.value {
            Value::Null => {}
            Value::Map(list) => {
                for (key, body) in list {
                    match build_agent(
                        cx,
                        key,
                        body,
                        Inherited {
                            defaults: &defaults,
                            overlay,
                        },
                        &providers,
                        base_dir,
                        &env.accounts,
                        &mut sources,
                        &mut rotation_at,
                    ) {
                        Some(spec) => {
                            specs.insert(spec.name.clone(), spec);
                        }
                        None => agents_ok = false,
                    }
                }
            }
            _ => {
                cx.push(
                    agents_node.pos,
                    None,
                    format!(
                        "`agents`: expected a mapping of agent names to their settings, found {}",
                        agents_node.kind_name()
                    ),
                );
                agents_ok = false;
            }
        }
    }

    // Writing a new version needs a writable store: only `dir` is one.
    if let Some(backend) = vault
        .as_ref()
        .filter(|v| !matches!(v, VaultConfig::Dir { .. }))
    {
        let name = match backend {
            VaultConfig::SystemdCreds => "systemd-creds",
            _ => "env",
        };
        for (agent, policies) in &rotation_at {
            for (secret, (_, pos)) in policies {
                cx.push(
                    *pos,
                    Some(agent),
                    format!(
                        "secret `{secret}` has a rotation policy, but the `{name}` vault backend is read-only; use `vault: {{ backend: dir }}` or rotate it outside the supervisor and remove `rotate_every`"
                    ),
                );
            }
        }
    }
    let rotation = rotation_at
        .into_iter()
        .map(|(agent, policies)| {
            let policies = policies.into_iter().map(|(s, (p, _))| (s, p)).collect();
            (agent, policies)
        })
        .collect();
    let fleet = Fleet {
        rotation,
        file: cx.file.to_owned(),
        base_dir: base_dir.to_owned(),
        version: version?,
        state_dir: state_dir?,
        vault: vault?,
        proxy,
        admin,
        providers,
        alerts,
        agents: specs,
    };
    (agents_ok && defaults_ok && providers_ok).then_some(Located {
        fleet,
        sources,
        warnings: Vec::new(),
    })
}

fn resolve_state_dir(
    cx: &mut Cx,
    written: Option<At<String>>,
    base_dir: &Path,
    env: &LoadEnv,
) -> Option<PathBuf> {
    match written {
        Some(dir) if dir.value.trim().is_empty() => {
            cx.push(
                dir.pos,
                None,
                "`state_dir` is empty; remove it to use the default, or name a directory",
            );
            None
        }
        Some(dir) => Some(base_dir.join(dir.value)),
        None => Some(match &env.state_directory {
            Some(dir) => dir.clone(),
            None => base_dir.join(".supervisor"),
        }),
    }
}

fn resolve_vault(cx: &mut Cx, raw: Option<RawVault>, base_dir: &Path) -> Option<VaultConfig> {
    let Some(raw) = raw else {
        return Some(VaultConfig::Dir {
            path: base_dir.join("secrets"),
        });
    };
    let backend = raw.backend.as_ref().map_or(Backend::Dir, |b| b.value);
    match (backend, raw.path) {
        (Backend::Dir, None) => Some(VaultConfig::Dir {
            path: base_dir.join("secrets"),
        }),
        (Backend::Dir, Some(path)) if path.value.trim().is_empty() => {
            cx.push(
                path.pos,
                None,
                "`vault.path` is empty; name the directory that holds the secrets",
            );
            None
        }
        (Backend::Dir, Some(path)) => Some(VaultConfig::Dir {
            path: base_dir.join(path.value),
        }),
        (other, Some(path)) => {
            cx.push(
                path.pos,
                None,
                format!(
                    "`vault.path` only applies to the `dir` backend, not `{}`; remove it",
                    other.name()
                ),
            );
            None
        }
        (Backend::SystemdCreds, None) => Some(VaultConfig::SystemdCreds),
        (Backend::Env, None) => Some(VaultConfig::Env),
    }
}

/// `[a-z0-9][a-z0-9_-]*`, at most 63 characters: safe in paths, unit names,
/// environment variable names (upper-cased) and metrics labels.
pub fn valid_agent_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok
        && name.len() <= 63
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what every shell and runtime can read back.
pub fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn check_env(cx: &mut Cx, agent: Option<&str>, field: &str, env: &RawEnv) {
    for (key, value) in env {
        if !valid_env_name(&key.value) {
            cx.push(
                key.pos,
                agent,
                format!(
                    "`{field}`: invalid environment variable name `{}`; use letters, digits and `_`, not starting with a digit",
                    key.value
                ),
            );
        } else if RESERVED_ENV.contains(&key.value.as_str()) {
            cx.push(
                key.pos,
                agent,
                format!(
                    "`{field}`: `{}` is set by the supervisor; remove it",
                    key.value
                ),
            );
        }
        if value.value.contains('\0') {
            cx.push(
                value.pos,
                agent,
                format!("`{field}.{}` contains a NUL character", key.value),
            );
        }
    }
}

fn check_defaults(cx: &mut Cx, defaults: &RawDefaults) {
    if defaults.runaway.is_some() {
        metering::resolve_runaway(cx, None, defaults.runaway.as_ref(), None);
    }
    if let Some(env) = &defaults.env {
        check_env(cx, None, "defaults.env", env);
    }
    let restart = defaults.restart.clone().unwrap_or_default();
    check_restart(
        cx,
        None,
        "defaults.restart",
        &restart,
        &RestartSpec::default(),
    );
}

/// Zero and inverted backoffs, reported at the fields written in `raw` (the
/// rest comes from `base`, which was checked where it was written).
fn check_restart(
    cx: &mut Cx,
    agent: Option<&str>,
    field: &str,
    raw: &RawRestart,
    base: &RestartSpec,
) -> bool {
    let mut ok = true;
    for (name, value) in [
        ("backoff_initial", &raw.backoff_initial),
        ("backoff_max", &raw.backoff_max),
    ] {
        if let Some(v) = value
            && v.value.0.is_zero()
        {
            cx.push(
                v.pos,
                agent,
                format!("`{field}.{name}` must be longer than zero"),
            );
            ok = false;
        }
    }
    let initial = raw
        .backoff_initial
        .as_ref()
        .map_or(base.backoff_initial, |d| d.value.0);
    let max = raw
        .backoff_max
        .as_ref()
        .map_or(base.backoff_max, |d| d.value.0);
    let blame = raw.backoff_initial.as_ref().or(raw.backoff_max.as_ref());
    if ok
        && initial > max
        && let Some(at) = blame
    {
        cx.push(
            at.pos,
            agent,
            format!(
                "`{field}.backoff_initial` ({}) is longer than `{field}.backoff_max` ({})",
                fmt_duration(initial),
                fmt_duration(max)
            ),
        );
        ok = false;
    }
    ok
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

fn merge_restart(raw: Option<&RawRestart>, base: &RestartSpec) -> RestartSpec {
    let Some(raw) = raw else { return *base };
    let pick = |v: &Option<At<Dur>>, d: Duration| v.as_ref().map_or(d, |v| v.value.0);
    RestartSpec {
        policy: raw.policy.map_or(base.policy, |p| match p {
            Policy::Never => RestartPolicy::Never,
            Policy::OnFailure => RestartPolicy::OnFailure,
            Policy::Always => RestartPolicy::Always,
        }),
        backoff_initial: pick(&raw.backoff_initial, base.backoff_initial),
        backoff_max: pick(&raw.backoff_max, base.backoff_max),
        reset_after: pick(&raw.reset_after, base.reset_after),
    }
}

fn merge_stop(raw: Option<&RawStop>, base: &StopSpec) -> StopSpec {
    let Some(raw) = raw else { return *base };
    StopSpec {
        signal: raw.signal.map_or(base.signal, |s| s.0),
        grace: raw.grace.map_or(base.grace, |g| g.0),
    }
}

/// What an agent takes from outside its own entry: `defaults`, and its
/// budget in the overlay.
#[derive(Clone, Copy)]
struct Inherited<'a> {
    defaults: &'a RawDefaults,
    overlay: &'a BTreeMap<String, (Pos, RawBudget)>,
}

/// Rotation policies of one agent, by secret name, with where each is written.
type AgentPolicies = BTreeMap<SecretName, (RotationPolicy, Pos)>;

/// Validates the object form of a secret reference into a policy; only one
/// with `rotate_every` is a policy, the other fields need it.
fn add_policy(
    cx: &mut Cx,
    agent: Option<&str>,
    field: &str,
    secret: &SecretName,
    raw: &RawSecretPolicy,
    out: &mut AgentPolicies,
) {
    let Some(every) = &raw.rotate_every else {
        for (written, what) in [
            (raw.issuer.as_ref().map(|a| a.pos), "issuer"),
            (raw.revoke.as_ref().map(|a| a.pos), "revoke"),
            (raw.grace.as_ref().map(|a| a.pos), "grace"),
        ] {
            if let Some(pos) = written {
                cx.push(
                    pos,
                    agent,
                    format!("`{field}.{what}` has no effect without `rotate_every`; add `rotate_every: 90d` or remove it"),
                );
            }
        }
        return;
    };
    if every.value.0 < Duration::from_secs(60) {
        cx.push(
            every.pos,
            agent,
            format!("`{field}.rotate_every` must be at least `1m`"),
        );
    }
    let argv = |cx: &mut Cx, what: &str, written: &Option<At<Argv>>| -> Option<Vec<String>> {
        let written = written.as_ref()?;
        let args: Vec<String> = written.value.0.iter().map(|a| a.value.clone()).collect();
        if args.first().is_none_or(|p| p.trim().is_empty()) {
            cx.push(
                written.pos,
                agent,
                format!("`{field}.{what}` is empty; give the program and its arguments, like `[./issue-key.sh]`"),
            );
            return None;
        }
        if args.iter().any(|a| a.contains('\0')) {
            cx.push(
                written.pos,
                agent,
                format!("`{field}.{what}` contains a NUL character"),
            );
            return None;
        }
        Some(args)
    };
    let issuer = argv(cx, "issuer", &raw.issuer);
    let revoke = argv(cx, "revoke", &raw.revoke);
    if raw.issuer.is_none() {
        cx.push(
            every.pos,
            agent,
            format!("`{field}.rotate_every` needs an `issuer`, a command that prints the new value on stdout"),
        );
    }
    let grace = raw
        .grace
        .as_ref()
        .map_or(Duration::from_secs(3600), |g| g.value.0);
    if let Some(previous) = out.get(secret) {
        cx.push(
            raw.name.pos,
            agent,
            format!(
                "`{field}`: secret `{secret}` already has a rotation policy at line {}; give it once",
                previous.1.line
            ),
        );
        return;
    }
    if let Some(issuer) = issuer {
        out.insert(
            secret.clone(),
            (
                RotationPolicy {
                    every: every.value.0,
                    issuer,
                    revoke,
                    grace,
                },
                raw.name.pos,
            ),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn build_agent(
    cx: &mut Cx,
    key: &Node,
    body: &Node,
    inherited: Inherited<'_>,
    providers: &BTreeMap<String, ProviderSpec>,
    base_dir: &Path,
    accounts: &Accounts,
    sources: &mut SourceMap,
    rotation: &mut BTreeMap<String, AgentPolicies>,
) -> Option<AgentSpec> {
    let Inherited { defaults, overlay } = inherited;
    let Some(name) = key.as_text() else {
        cx.push(
            key.pos,
            None,
            format!("agent names must be strings, found {}", key.kind_name()),
        );
        return None;
    };
    let agent = Some(name);
    let errors_before = cx.errors.len();
    if !valid_agent_name(name) {
        cx.push(
            key.pos,
            agent,
            "invalid agent name; use lower-case letters, digits, `_` and `-`, starting with a letter or digit (at most 63)",
        );
    }
    sources.agents.insert(name.to_owned(), key.pos);

    if !matches!(body.value, Value::Map(_)) {
        cx.push(
            body.pos,
            agent,
            format!(
                "expected a mapping of agent settings (at least `command`), found {}",
                body.kind_name()
            ),
        );
        return None;
    }
    let raw = match node::from_node_all::<RawAgent>(body) {
        Ok(raw) => raw,
        Err(partial) => {
            for err in &partial.errors {
                // A missing field is reported at the agent's name, not at its first field.
                let pos = if err.missing_field && err.path().is_empty() {
                    key.pos
                } else {
                    err.pos.unwrap_or(body.pos)
                };
                cx.node_error(err, pos, agent, None);
            }
            // Check what is left too, so one broken field hides nothing else.
            partial.rest?
        }
    };

    // command
    let argv = &raw.command.value.0;
    match argv.first() {
        None => cx.push(
            raw.command.pos,
            agent,
            "`command` is empty; give the program and its arguments, like `[python3, agent.py]`",
        ),
        Some(program) if program.value.trim().is_empty() => cx.push(
            program.pos,
            agent,
            "`command[0]` is empty; name the program to run",
        ),
        Some(_) => {}
    }
    for (i, arg) in argv.iter().enumerate() {
        if arg.value.contains('\0') {
            cx.push(
                arg.pos,
                agent,
                format!("`command[{i}]` contains a NUL character"),
            );
        }
    }

    // cwd
    let cwd = match &raw.cwd {
        Some(cwd) if cwd.value.trim().is_empty() => {
            cx.push(
                cwd.pos,
                agent,
                "`cwd` is empty; remove it to run in the fleet directory",
            );
            base_dir.to_owned()
        }
        Some(cwd) => base_dir.join(&cwd.value),
        None => base_dir.to_owned(),
    };

    // env: defaults overlaid by the agent's own
    let own_env = raw.env.clone().unwrap_or_default();
    check_env(cx, agent, "env", &own_env);
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in defaults.env.iter().flatten().chain(&own_env) {
        env.insert(k.value.clone(), v.value.clone());
    }

    // secrets
    let mut secrets = BTreeMap::new();
    let mut policies = BTreeMap::new();
    for (var, written) in raw.secrets.iter().flatten() {
        let (secret_text, secret_pos) = written.value.name(written.pos);
        sources
            .secrets
            .insert((name.to_owned(), var.value.clone()), secret_pos);
        if !valid_env_name(&var.value) {
            cx.push(
                var.pos,
                agent,
                format!(
                    "`secrets`: invalid environment variable name `{}`; use letters, digits and `_`, not starting with a digit",
                    var.value
                ),
            );
        } else if RESERVED_ENV.contains(&var.value.as_str()) {
            cx.push(
                var.pos,
                agent,
                format!(
                    "`secrets`: `{}` is set by the supervisor; remove it",
                    var.value
                ),
            );
        } else if env.contains_key(&var.value) {
            cx.push(
                var.pos,
                agent,
                format!(
                    "`{}` is set in both `env` and `secrets`; keep one",
                    var.value
                ),
            );
        }
        match SecretName::parse(secret_text) {
            Ok(secret_name) => {
                if let RawSecretRef::Policy(raw_policy) = &written.value {
                    let field = format!("secrets.{}", var.value);
                    add_policy(cx, agent, &field, &secret_name, raw_policy, &mut policies);
                }
                secrets.insert(var.value.clone(), secret_name);
            }
            Err(err) => cx.push(secret_pos, agent, format!("`secrets.{}`: {err}", var.value)),
        }
    }
    for (i, entry) in raw.llm.iter().flatten().enumerate() {
        if let Some(At {
            value: RawSecretRef::Policy(raw_policy),
            ..
        }) = &entry.value.key
            && let Ok(secret_name) = SecretName::parse(&raw_policy.name.value)
        {
            let field = format!("llm[{i}].key");
            add_policy(cx, agent, &field, &secret_name, raw_policy, &mut policies);
        }
    }
    if !policies.is_empty() {
        rotation.insert(name.to_owned(), policies);
    }

    // restart and stop: agent field, else defaults field, else built-in
    let base_restart = merge_restart(defaults.restart.as_ref(), &RestartSpec::default());
    let restart = merge_restart(raw.restart.as_ref(), &base_restart);
    if let Some(own) = &raw.restart {
        check_restart(cx, agent, "restart", own, &base_restart);
    }
    let base_stop = merge_stop(defaults.stop.as_ref(), &StopSpec::default());
    let stop = merge_stop(raw.stop.as_ref(), &base_stop);

    // llm, budget, runaway
    let taken_env: BTreeSet<String> = env.keys().chain(secrets.keys()).cloned().collect();
    let mut key_positions = Vec::new();
    let llm = metering::resolve_llm(
        cx,
        name,
        raw.llm.as_deref().unwrap_or_default(),
        providers,
        &taken_env,
        &mut key_positions,
    );
    sources.llm_keys.insert(name.to_owned(), key_positions);
    let budget = metering::resolve_budget(
        cx,
        name,
        defaults.budget.as_ref(),
        overlay.get(name).map(|(_, budget)| budget),
        raw.budget.as_ref(),
        &llm,
        providers,
    );
    let runaway =
        metering::resolve_runaway(cx, agent, defaults.runaway.as_ref(), raw.runaway.as_ref());

    // user and group: each the agent's, else the defaults'
    let user = raw.user.as_ref().or(defaults.user.as_ref());
    let group = raw.group.as_ref().or(defaults.group.as_ref());
    // A `user:` that did not parse was reported already; not again as missing.
    let user_written = matches!(&body.value, Value::Map(fields)
        if fields.iter().any(|(k, _)| k.as_text() == Some("user")));
    let run_as = match (user, group) {
        (None, None) => None,
        (None, Some(_)) if user_written => None,
        (None, Some(group)) => {
            cx.push(
                group.pos,
                agent,
                "`group` is set without `user`; name the user the agent runs as too",
            );
            None
        }
        (Some(user), group) => {
            sources.run_as.insert(name.to_owned(), user.pos);
            match accounts.resolve(&user.value.0, group.map(|g| g.value.0.as_str())) {
                Ok(run_as) => Some(run_as),
                Err((field, message)) => {
                    let pos = match (field, group) {
                        ("group", Some(group)) => group.pos,
                        _ => user.pos,
                    };
                    cx.push(pos, agent, format!("`{field}`: {message}"));
                    None
                }
            }
        }
    };

    (cx.errors.len() == errors_before).then(|| AgentSpec {
        name: name.to_owned(),
        command: argv.iter().map(|a| a.value.clone()).collect(),
        cwd,
        env,
        secrets,
        restart,
        stop,
        llm,
        budget,
        runaway,
        run_as,
    })
}

/// `fleet.yaml` text parsed as if it were `/srv/fleet/fleet.yaml`, with every
/// problem as its one-line text: what the section parsers' tests compare.
#[cfg(test)]
pub(super) fn parse_for_tests(source: &str) -> Result<super::model::Fleet, Vec<String>> {
    parse_fleet(
        Path::new("fleet.yaml"),
        Path::new("/srv/fleet"),
        source,
        &LoadEnv::default(),
    )
    .map(|l| l.fleet)
    .map_err(|e| e.errors.iter().map(ToString::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(source: &str) -> Vec<String> {
        match parse_fleet(
            Path::new("fleet.yaml"),
            Path::new("/srv/fleet"),
            source,
            &LoadEnv::default(),
        ) {
            Ok(_) => vec![],
            Err(e) => e.errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn load_ok(source: &str) -> Fleet {
        match parse_fleet(
            Path::new("fleet.yaml"),
            Path::new("/srv/fleet"),
            source,
            &LoadEnv::default(),
        ) {
            Ok(located) => located.fleet,
            Err(e) => panic!("{}", e.report()),
        }
    }

    #[test]
    fn secrets_take_a_name_or_a_rotation_policy() {
        let fleet = load_ok(
            "version: 1
providers: { claude: { kind: anthropic } }
agents:
  a:
    command: [a]
    secrets:
      TOKEN: { name: tok, rotate_every: 90d, issuer: [./issue.sh, tok], revoke: [./revoke.sh], grace: 2h }
      PLAIN: plain
      NAMED: { name: named }
    llm:
      - { provider: claude, key: { name: llm_key, rotate_every: 30d, issuer: [./issue-llm.sh] } }
",
        );
        let a = &fleet.agents["a"];
        assert_eq!(a.secrets["TOKEN"].as_str(), "tok");
        assert_eq!(a.secrets["PLAIN"].as_str(), "plain");
        assert_eq!(a.secrets["NAMED"].as_str(), "named");
        assert_eq!(a.llm[0].key.as_ref().unwrap().as_str(), "llm_key");
        let policies = &fleet.rotation["a"];
        let names: Vec<&str> = policies.keys().map(SecretName::as_str).collect();
        assert_eq!(names, ["llm_key", "tok"]);
        let day = Duration::from_secs(86_400);
        assert_eq!(
            policies[&SecretName::parse("tok").unwrap()],
            RotationPolicy {
                every: day * 90,
                issuer: vec!["./issue.sh".into(), "tok".into()],
                revoke: Some(vec!["./revoke.sh".into()]),
                grace: Duration::from_secs(7200),
            }
        );
        let llm = &policies[&SecretName::parse("llm_key").unwrap()];
        assert_eq!(
            (llm.every, llm.revoke.clone(), llm.grace),
            (day * 30, None, Duration::from_secs(3600))
        );
    }

    #[test]
    fn rotation_policy_problems_are_located() {
        let got = errors(
            "version: 1
agents:
  a:
    command: [a]
    secrets:
      A: { name: a, rotate_every: 90d }
      B: { name: b, issuer: [x], grace: 1h }
      C: { name: c, rotate_every: 10s, issuer: [] }
      D: { name: d, rotate_evry: 90d }
      E: { name: ../e, rotate_every: 1d, issuer: [x] }
      F: [not, a, name]
",
        );
        assert_eq!(
            got,
            [
                "fleet.yaml:6:35: agent \"a\": `secrets.A.rotate_every` needs an `issuer`, a command that prints the new value on stdout",
                "fleet.yaml:7:29: agent \"a\": `secrets.B.issuer` has no effect without `rotate_every`; add `rotate_every: 90d` or remove it",
                "fleet.yaml:7:41: agent \"a\": `secrets.B.grace` has no effect without `rotate_every`; add `rotate_every: 90d` or remove it",
                "fleet.yaml:8:35: agent \"a\": `secrets.C.rotate_every` must be at least `1m`",
                "fleet.yaml:8:48: agent \"a\": `secrets.C.issuer` is empty; give the program and its arguments, like `[./issue-key.sh]`",
                "fleet.yaml:9:21: agent \"a\": `secrets.D`: unknown field `rotate_evry`, expected one of `name`, `rotate_every`, `issuer`, `revoke`, `grace`",
                "fleet.yaml:10:18: agent \"a\": `secrets.E`: invalid secret name `../e`: use letters, digits, `_`, `.` and `-` only (no `/`, not `.` or `..`)",
                "fleet.yaml:11:10: agent \"a\": `secrets.F`: invalid type: sequence, expected a secret name, or a mapping like `{ name: key, rotate_every: 90d, issuer: [...] }`",
            ]
        );
        // Only the `dir` backend can take a new version.
        let got = errors(
            "version: 1
vault: { backend: systemd-creds }
agents:
  a:
    command: [a]
    secrets: { T: { name: t, rotate_every: 90d, issuer: [x] } }
",
        );
        assert_eq!(
            got,
            [
                "fleet.yaml:6:27: agent \"a\": secret `t` has a rotation policy, but the `systemd-creds` vault backend is read-only; use `vault: { backend: dir }` or rotate it outside the supervisor and remove `rotate_every`"
            ]
        );
    }

    #[test]
    fn minimal_fleet_gets_every_default() {
        let fleet = load_ok("version: 1\nagents:\n  a:\n    command: [python3, a.py]\n");
        assert_eq!(fleet.version, 1);
        assert_eq!(fleet.file, PathBuf::from("fleet.yaml"));
        assert_eq!(fleet.base_dir, PathBuf::from("/srv/fleet"));
        assert_eq!(fleet.state_dir, PathBuf::from("/srv/fleet/.supervisor"));
        assert_eq!(
            fleet.vault,
            VaultConfig::Dir {
                path: "/srv/fleet/secrets".into()
            }
        );
        let a = &fleet.agents["a"];
        assert_eq!(a.name, "a");
        assert_eq!(a.command, vec!["python3", "a.py"]);
        assert_eq!(a.cwd, PathBuf::from("/srv/fleet"));
        assert!(a.env.is_empty() && a.secrets.is_empty());
        assert_eq!(a.restart, RestartSpec::default());
        assert_eq!(a.stop, StopSpec::default());
    }

    #[test]
    fn empty_agents_is_a_valid_fleet() {
        assert!(load_ok("version: 1\nagents: {}\n").agents.is_empty());
        assert!(load_ok("version: 1\nagents:\n").agents.is_empty());
    }

    #[test]
    fn defaults_merge_per_key_and_per_field() {
        let fleet = load_ok(
            "version: 1
defaults:
  env: {LOG_LEVEL: info, REGION: eu}
  restart: {policy: always, backoff_max: 1m}
  stop: {signal: SIGINT}
agents:
  a:
    command: [a]
    cwd: agents/a
    env: {LOG_LEVEL: debug, PORT: 8080, RATIO: 1.50, FLAG: true, MODE: 0755}
    secrets: {API_KEY: llm_api_key}
    restart: {backoff_initial: 2s}
    stop: {grace: 30s}
  b:
    command: [b]
    restart: {policy: never, reset_after: 1h30m}
    stop: {signal: TERM, grace: 500ms}
",
        );
        let a = &fleet.agents["a"];
        let env: Vec<(&str, &str)> = a
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("FLAG", "true"),
                ("LOG_LEVEL", "debug"),
                ("MODE", "0755"),
                ("PORT", "8080"),
                ("RATIO", "1.50"),
                ("REGION", "eu")
            ]
        );
        assert_eq!(a.cwd, PathBuf::from("/srv/fleet/agents/a"));
        assert_eq!(a.secrets["API_KEY"].as_str(), "llm_api_key");
        assert_eq!(
            a.restart,
            RestartSpec {
                policy: RestartPolicy::Always,
                backoff_initial: Duration::from_secs(2),
                backoff_max: Duration::from_secs(60),
                reset_after: Duration::from_secs(600),
            }
        );
        assert_eq!(
            a.stop,
            StopSpec {
                signal: nix::sys::signal::Signal::SIGINT,
                grace: Duration::from_secs(30)
            }
        );
        let b = &fleet.agents["b"];
        assert_eq!(b.env.len(), 2);
        assert_eq!(b.restart.policy, RestartPolicy::Never);
        assert_eq!(b.restart.backoff_max, Duration::from_secs(60));
        assert_eq!(b.restart.reset_after, Duration::from_secs(5400));
        assert_eq!(
            b.stop,
            StopSpec {
                signal: nix::sys::signal::Signal::SIGTERM,
                grace: Duration::from_millis(500)
            }
        );
    }

    #[test]
    fn state_dir_and_vault_resolution() {
        let env = LoadEnv {
            state_directory: Some("/var/lib/agent-supervisor".into()),
            ..LoadEnv::default()
        };
        let cases: &[(&str, &LoadEnv, &str, VaultConfig)] = &[
            (
                "",
                &LoadEnv::default(),
                "/srv/fleet/.supervisor",
                VaultConfig::Dir {
                    path: "/srv/fleet/secrets".into(),
                },
            ),
            (
                "",
                &env,
                "/var/lib/agent-supervisor",
                VaultConfig::Dir {
                    path: "/srv/fleet/secrets".into(),
                },
            ),
            (
                "state_dir: run\n",
                &env,
                "/srv/fleet/run",
                VaultConfig::Dir {
                    path: "/srv/fleet/secrets".into(),
                },
            ),
            (
                "state_dir: /tmp/s\n",
                &env,
                "/tmp/s",
                VaultConfig::Dir {
                    path: "/srv/fleet/secrets".into(),
                },
            ),
            (
                "vault: {backend: dir}\n",
                &env,
                "/var/lib/agent-supervisor",
                VaultConfig::Dir {
                    path: "/srv/fleet/secrets".into(),
                },
            ),
            (
                "vault: {path: /etc/vault}\n",
                &env,
                "/var/lib/agent-supervisor",
                VaultConfig::Dir {
                    path: "/etc/vault".into(),
                },
            ),
            (
                "vault: {backend: dir, path: s}\n",
                &env,
                "/var/lib/agent-supervisor",
                VaultConfig::Dir {
                    path: "/srv/fleet/s".into(),
                },
            ),
            (
                "vault: {backend: systemd-creds}\n",
                &env,
                "/var/lib/agent-supervisor",
                VaultConfig::SystemdCreds,
            ),
            (
                "vault: {backend: env}\n",
                &env,
                "/var/lib/agent-supervisor",
                VaultConfig::Env,
            ),
        ];
        for (extra, env, state_dir, vault) in cases {
            let source = format!("version: 1\n{extra}agents: {{}}\n");
            let fleet = parse_fleet(
                Path::new("fleet.yaml"),
                Path::new("/srv/fleet"),
                &source,
                env,
            )
            .map_err(|e| e.report())
            .unwrap()
            .fleet;
            assert_eq!(fleet.state_dir, PathBuf::from(state_dir), "{extra}");
            assert_eq!(&fleet.vault, vault, "{extra}");
        }
    }

    fn accounts() -> LoadEnv {
        use crate::fleet::{GroupEntry, UserEntry};
        LoadEnv {
            accounts: Accounts::Fixed {
                users: vec![
                    UserEntry {
                        name: "alice".into(),
                        uid: 1001,
                        gid: 1001,
                        home: "/home/alice".into(),
                    },
                    UserEntry {
                        name: "bob".into(),
                        uid: 1002,
                        gid: 1002,
                        home: "/home/bob".into(),
                    },
                ],
                groups: vec![GroupEntry {
                    name: "agents".into(),
                    gid: 2000,
                    members: vec!["bob".into()],
                }],
            },
            ..LoadEnv::default()
        }
    }

    fn parse_with_accounts(source: &str) -> Result<Located, Vec<String>> {
        parse_fleet(
            Path::new("fleet.yaml"),
            Path::new("/srv/fleet"),
            source,
            &accounts(),
        )
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn user_and_group_resolve_per_field_over_defaults() {
        let located = parse_with_accounts(
            "version: 1
defaults: { user: alice }
agents:
  a:
    command: [x]
  b:
    command: [x]
    user: 1002
    group: agents
  c:
    command: [x]
    group: 2000
  d:
    command: [x]
    user: bob
",
        )
        .unwrap();
        let agents = &located.fleet.agents;
        let a = agents["a"].run_as.as_ref().unwrap();
        assert_eq!((a.user.as_str(), a.uid, a.gid), ("alice", 1001, 1001));
        assert_eq!(a.groups, [1001]);
        assert_eq!(a.home, PathBuf::from("/home/alice"));
        let b = agents["b"].run_as.as_ref().unwrap();
        assert_eq!((b.user.as_str(), b.uid, b.gid), ("bob", 1002, 2000));
        assert_eq!(b.groups, [2000]);
        let c = agents["c"].run_as.as_ref().unwrap();
        assert_eq!((c.user.as_str(), c.gid), ("alice", 2000));
        let d = agents["d"].run_as.as_ref().unwrap();
        assert_eq!(
            (d.uid, d.gid, d.groups.as_slice()),
            (1002, 1002, &[1002, 2000][..])
        );
        // Where the account that applies was written: the agent's, else the defaults'.
        assert_eq!(located.sources.run_as("a"), Some(Pos::new(2, 19)));
        assert_eq!(located.sources.run_as("b"), Some(Pos::new(8, 11)));

        let none = parse_with_accounts("version: 1\nagents:\n  a:\n    command: [x]\n").unwrap();
        assert_eq!(none.fleet.agents["a"].run_as, None);
        assert_eq!(none.sources.run_as("a"), None);
        // A different account is a different launch: the agent restarts on reload.
        assert_ne!(agents["a"].launch_view(), agents["d"].launch_view());
    }

    #[test]
    fn user_and_group_errors_are_located() {
        let got = parse_with_accounts(
            "version: 1
defaults: { group: agents }
agents:
  a:
    command: [x]
  b:
    command: [x]
    user: carol
  c:
    command: [x]
    user: bob
    group: wheel
  d:
    command: [x]
    user: ''
  e:
    command: [x]
    user: [bob]
",
        )
        .unwrap_err();
        assert_eq!(
            got,
            [
                "fleet.yaml:2:20: agent \"a\": `group` is set without `user`; name the user the agent runs as too",
                "fleet.yaml:8:11: agent \"b\": `user`: no user `carol` on this host (hint: create it, e.g. `useradd --system --no-create-home carol`, or fix the name)",
                "fleet.yaml:12:12: agent \"c\": `group`: no group `wheel` on this host (hint: create it, e.g. `groupadd --system wheel`, or fix the name)",
                "fleet.yaml:15:11: agent \"d\": `user`: invalid account ``: give a user or group name, like `agents`, or a numeric id",
                "fleet.yaml:18:11: agent \"e\": `user`: invalid type: sequence, expected a user or group name, or a numeric id",
            ]
        );
    }

    #[test]
    fn source_map_locates_agents_and_secret_entries() {
        let located = parse_fleet(
            Path::new("fleet.yaml"),
            Path::new("/srv"),
            "version: 1\nagents:\n  a:\n    command: [a]\n    secrets:\n      TOKEN: tok\n",
            &LoadEnv::default(),
        )
        .unwrap();
        assert_eq!(located.sources.agent("a"), Some(Pos::new(3, 3)));
        assert_eq!(located.sources.secret("a", "TOKEN"), Some(Pos::new(6, 14)));
        assert_eq!(located.sources.secret("a", "OTHER"), None);
    }

    /// Every problem in a file, with its exact text and place.
    #[test]
    fn errors_are_all_collected_with_locations() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "malformed YAML",
                "version: [1\n",
                &["fleet.yaml:1:10: invalid YAML: unclosed bracket '['"],
            ),
            (
                "empty file",
                "",
                &[
                    "fleet.yaml:1:1: the file is empty; expected a mapping with `version` and `agents`",
                ],
            ),
            (
                "not a mapping",
                "- 1\n",
                &[
                    "fleet.yaml:1:1: expected a mapping with `version` and `agents` at the top level, found a list",
                ],
            ),
            (
                "missing version and agents",
                "state_dir: x\n",
                &[
                    "fleet.yaml:1:1: missing field `version`; add `version: 1` at the top",
                    "fleet.yaml:1:1: missing field `agents`",
                ],
            ),
            (
                "bad top level",
                "version: 2\nproxxy: {}\nvault: {backend: envv, pth: x}\ndefaults: {restart: always}\nagents: []\n",
                &[
                    "fleet.yaml:1:10: unsupported `version` 2; this supervisor reads version 1",
                    "fleet.yaml:2:1: unknown field `proxxy`, expected one of `version`, `state_dir`, `vault`, `proxy`, `admin`, `alerts`, `providers`, `defaults`, `agents`",
                    "fleet.yaml:3:18: `vault.backend`: unknown variant `envv`, expected one of `dir`, `systemd-creds`, `env`",
                    "fleet.yaml:3:24: `vault`: unknown field `pth`, expected `backend` or `path`",
                    "fleet.yaml:4:21: `defaults.restart`: invalid type: string \"always\", expected a mapping with `policy`, `backoff_initial`, `backoff_max`, `reset_after`",
                    "fleet.yaml:5:9: `agents`: expected a mapping of agent names to their settings, found a list",
                ],
            ),
            (
                "vault path with another backend, empty state_dir",
                "version: 1\nstate_dir: ''\nvault: {backend: env, path: s}\nagents: {}\n",
                &[
                    "fleet.yaml:2:12: `state_dir` is empty; remove it to use the default, or name a directory",
                    "fleet.yaml:3:29: `vault.path` only applies to the `dir` backend, not `env`; remove it",
                ],
            ),
            (
                "wrong type for version",
                "version: one\nagents: {}\n",
                &["fleet.yaml:1:10: `version`: invalid type: string \"one\", expected u32"],
            ),
            (
                "several agents, several problems",
                "version: 1
agents:
  a:
    command: [x]
    restrat: {}
    stop: {signal: SIGFOO}
  B:
    command: ''
  c:
  d:
    cwd: x
  a:
    command: [y]
",
                &[
                    "fleet.yaml:5:5: agent \"a\": unknown field `restrat`, expected one of `command`, `cwd`, `env`, `secrets`, `restart`, `stop`, `llm`, `budget`, `runaway`, `user`, `group`",
                    "fleet.yaml:6:20: agent \"a\": `stop.signal`: unknown signal `SIGFOO`, expected a name like `SIGTERM`, `SIGINT`, `SIGQUIT` or `SIGHUP`",
                    "fleet.yaml:7:3: agent \"B\": invalid agent name; use lower-case letters, digits, `_` and `-`, starting with a letter or digit (at most 63)",
                    "fleet.yaml:8:14: agent \"B\": `command`: invalid type: string \"\", expected a list of arguments, like `[python3, agent.py]`",
                    "fleet.yaml:9:4: agent \"c\": expected a mapping of agent settings (at least `command`), found nothing",
                    "fleet.yaml:10:3: agent \"d\": missing field `command`",
                    "fleet.yaml:12:3: agent \"a\": duplicate agent name, first defined at line 3; agent names must be unique",
                ],
            ),
            (
                "semantic problems in one agent",
                "version: 1
agents:
  a:
    command: []
    env: {1X: y, SUPERVISOR_AGENT: z, GOOD: ok}
    secrets: {T: ../x, GOOD: fine, 'A-B': x}
    restart: {backoff_initial: 10m, backoff_max: 0s}
    cwd: ''
",
                &[
                    "fleet.yaml:4:14: agent \"a\": `command` is empty; give the program and its arguments, like `[python3, agent.py]`",
                    "fleet.yaml:5:11: agent \"a\": `env`: invalid environment variable name `1X`; use letters, digits and `_`, not starting with a digit",
                    "fleet.yaml:5:18: agent \"a\": `env`: `SUPERVISOR_AGENT` is set by the supervisor; remove it",
                    "fleet.yaml:6:18: agent \"a\": `secrets.T`: invalid secret name `../x`: use letters, digits, `_`, `.` and `-` only (no `/`, not `.` or `..`)",
                    "fleet.yaml:6:24: agent \"a\": `GOOD` is set in both `env` and `secrets`; keep one",
                    "fleet.yaml:6:36: agent \"a\": `secrets`: invalid environment variable name `A-B`; use letters, digits and `_`, not starting with a digit",
                    "fleet.yaml:7:50: agent \"a\": `restart.backoff_max` must be longer than zero",
                    "fleet.yaml:8:10: agent \"a\": `cwd` is empty; remove it to run in the fleet directory",
                ],
            ),
            (
                "a broken field does not hide the other fields' problems",
                "version: 1\nagents:\n  a:\n    command: [' ']\n    env: {OK: [1]}\n",
                &[
                    "fleet.yaml:4:15: agent \"a\": `command[0]` is empty; name the program to run",
                    "fleet.yaml:5:15: agent \"a\": `env.OK`: invalid type: sequence, expected a string",
                ],
            ),
            (
                "backoff order against defaults, duplicate nested key",
                "version: 1
defaults:
  restart: {backoff_max: 2s, backoff_initial: 0s}
agents:
  a:
    command: [x]
    restart: {backoff_initial: 10m}
    secrets: {T: x, T: y}
  b:
    command: [x]
    restart: {backoff_initial: 5s}
",
                &[
                    "fleet.yaml:3:47: `defaults.restart.backoff_initial` must be longer than zero",
                    "fleet.yaml:7:32: agent \"a\": `restart.backoff_initial` (10m) is longer than `restart.backoff_max` (2s)",
                    "fleet.yaml:8:21: agent \"a\": duplicate key `secrets.T`, first defined at line 8",
                    "fleet.yaml:11:32: agent \"b\": `restart.backoff_initial` (5s) is longer than `restart.backoff_max` (2s)",
                ],
            ),
            (
                "bad durations and signals",
                "version: 1\nagents:\n  a:\n    command: [x]\n    stop: {grace: 10}\n    restart: {reset_after: soon, policy: sometimes}\n",
                &[
                    "fleet.yaml:5:19: agent \"a\": `stop.grace`: invalid duration `10`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`",
                    "fleet.yaml:6:28: agent \"a\": `restart.reset_after`: invalid duration `soon`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`",
                    "fleet.yaml:6:42: agent \"a\": `restart.policy`: unknown variant `sometimes`, expected one of `never`, `on-failure`, `always`",
                ],
            ),
            (
                "wrong types",
                "version: 1\nagents:\n  a:\n    command: python3 a.py\n    env: [A]\n  b:\n    command: [x, {y: 1}]\n",
                &[
                    "fleet.yaml:4:14: agent \"a\": `command`: invalid type: string \"python3 a.py\", expected a list of arguments, like `[python3, agent.py]`",
                    "fleet.yaml:5:10: agent \"a\": `env`: invalid type: sequence, expected a map",
                    "fleet.yaml:7:18: agent \"b\": `command[1]`: invalid type: map, expected a string",
                ],
            ),
        ];
        for (what, source, want) in cases {
            assert_eq!(errors(source), *want, "{what}");
        }
    }

    #[test]
    fn integers_are_named_with_their_value() {
        assert_eq!(
            errors("version: 1\nagents:\n  a:\n    command: 5\n"),
            [
                "fleet.yaml:4:14: agent \"a\": `command`: invalid type: integer `5`, expected a list of arguments, like `[python3, agent.py]`"
            ]
        );
    }

    #[test]
    fn unreadable_oversized_and_non_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let read = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            read_source(&path).unwrap_err()
        };
        let big = read("big.yaml", &vec![b'#'; MAX_FILE_BYTES as usize + 1]);
        assert_eq!(
            big.errors[0].message,
            "the file is larger than 1024 KiB; a fleet file is never this big"
        );
        let bad = read("bad.yaml", b"version: 1\nagents:\n  a\xff: {}\n");
        assert_eq!((bad.errors[0].line, bad.errors[0].column), (3, 4));
        assert_eq!(
            bad.errors[0].message,
            "the file is not UTF-8 text; save it as UTF-8"
        );
        let missing = read_source(&dir.path().join("absent.yaml")).unwrap_err();
        assert_eq!(
            missing.unreadable.map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
        let folder = read_source(dir.path()).unwrap_err();
        assert!(folder.unreadable.is_some() && folder.errors.is_empty());
        // A FIFO nobody writes to, or a device, in place of the file: refused
        // at once (a blocking open or read would never return).
        let fifo = dir.path().join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let refused = read_source(&fifo).unwrap_err();
        assert_eq!(
            refused.unreadable.map(|e| e.to_string()).as_deref(),
            Some("it is a FIFO (named pipe), not a regular file")
        );
        let device = read_source(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            device.unreadable.map(|e| e.to_string()).as_deref(),
            Some("it is a device, not a regular file")
        );
    }

    #[test]
    fn names() {
        for ok in ["a", "0", "sparkles", "agent-1", "a_b", &"x".repeat(63)] {
            assert!(valid_agent_name(ok), "{ok}");
        }
        for bad in ["", "A", "-a", "_a", "a.b", "a b", "é", &"x".repeat(64)] {
            assert!(!valid_agent_name(bad), "{bad}");
        }
        for ok in ["A", "_", "a1", "GMAIL_TOKEN", "_x9"] {
            assert!(valid_env_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A.B", "A B", "É"] {
            assert!(!valid_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn input_budgets_refuse_alias_bombs() {
        let bomb = "version: 1
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
agents: {}
";
        let errs = errors(bomb);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("fleet.yaml:") && errs[0].contains("invalid YAML: "),
            "{errs:?}"
        );
    }

    #[test]
    fn anchors_and_merge_keys_work_within_budget() {
        let fleet = load_ok(
            "version: 1
agents:
  a: &base
    command: [x]
    env: {A: '1'}
  b:
    <<: *base
    cwd: b
",
        );
        assert_eq!(fleet.agents["b"].command, vec!["x"]);
        assert_eq!(fleet.agents["b"].env["A"], "1");
    }
}
