//! Configuration errors as users see them: `file:line:col: agent "x": message`,
//! collected into one report. Owns the wording of the report's frame (headline
//! and hint); must not know how problems were found.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// One problem in a fleet file, at a place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The fleet file as the user named it.
    pub file: PathBuf,
    /// 1-based.
    pub line: u32,
    /// 1-based.
    pub column: u32,
    /// The agent the problem belongs to, if any.
    pub agent: Option<String>,
    /// Lower-case, names things in backticks, never holds a secret value.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(agent) = &self.agent {
            write!(f, "agent \"{agent}\": ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Why a fleet file was refused: it could not be read, or it holds one or more
/// problems (all of them, in file order).
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    /// Every problem found, sorted by position. Empty when `unreadable` is set.
    pub errors: Vec<ConfigError>,
    /// Set when the file itself could not be read.
    pub unreadable: Option<io::Error>,
}

impl ConfigErrors {
    pub fn unreadable(file: &Path, cause: io::Error) -> Self {
        Self {
            file: file.to_owned(),
            errors: Vec::new(),
            unreadable: Some(cause),
        }
    }

    /// Sorts problems by position (a stable sort: problems at one place keep
    /// the order they were found in) and drops exact repeats.
    pub fn invalid(file: &Path, mut errors: Vec<ConfigError>) -> Self {
        errors.sort_by_key(|e| (e.line, e.column));
        errors.dedup();
        Self {
            file: file.to_owned(),
            errors,
            unreadable: None,
        }
    }

    /// The first line of the report, without the `error: ` prefix.
    pub fn headline(&self) -> String {
        let file = self.file.display();
        match (&self.unreadable, self.errors.len()) {
            (Some(_), _) => format!("cannot read `{file}`"),
            (None, 1) => format!("`{file}` is not valid (1 problem)"),
            (None, n) => format!("`{file}` is not valid ({n} problems)"),
        }
    }

    /// What to do next.
    pub fn hint(&self) -> String {
        match &self.unreadable {
            Some(cause) if cause.kind() == io::ErrorKind::NotFound => format!(
                "run from the directory that holds `{}`, or name the fleet file with `-f PATH`",
                self.file.display()
            ),
            Some(cause) if cause.kind() == io::ErrorKind::PermissionDenied => {
                "make the file readable by the user the supervisor runs as".to_owned()
            }
            Some(_) => "check that the path names a readable, regular file".to_owned(),
            None => "fix each problem at the line and column shown; README.md documents every \
                     fleet.yaml field"
                .to_owned(),
        }
    }

    /// The whole report as `check` prints it to stderr and `run` logs it:
    ///
    /// ```text
    /// error: `fleet.yaml` is not valid (2 problems)
    /// fleet.yaml:3:5: agent "a": unknown field `restrat`, expected one of ...
    /// fleet.yaml:9:14: agent "b": invalid duration `5x`: ...
    /// hint: ...
    /// ```
    pub fn report(&self) -> String {
        let mut out = format!("error: {}\n", self.headline());
        if let Some(cause) = &self.unreadable {
            out.push_str(&format!("caused by: {cause}\n"));
        }
        for error in &self.errors {
            out.push_str(&format!("{error}\n"));
        }
        out.push_str(&format!("hint: {}\n", self.hint()));
        out
    }
}

impl fmt::Display for ConfigErrors {
    /// The headline and each problem on its own line (no `error:`/`hint:` frame).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.headline())?;
        if let Some(cause) = &self.unreadable {
            write!(f, ": {cause}")?;
        }
        for error in &self.errors {
            write!(f, "\n{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.unreadable.as_ref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: u32, column: u32, agent: Option<&str>, message: &str) -> ConfigError {
        ConfigError {
            file: "fleet.yaml".into(),
            line,
            column,
            agent: agent.map(str::to_owned),
            message: message.to_owned(),
        }
    }

    #[test]
    fn one_error_displays_file_line_column_agent_message() {
        assert_eq!(
            err(14, 5, Some("soundwave"), "unknown field `restrat`").to_string(),
            "fleet.yaml:14:5: agent \"soundwave\": unknown field `restrat`"
        );
        assert_eq!(
            err(1, 10, None, "unsupported `version` 2").to_string(),
            "fleet.yaml:1:10: unsupported `version` 2"
        );
    }

    #[test]
    fn report_sorts_dedups_and_counts() {
        let errors = ConfigErrors::invalid(
            Path::new("fleet.yaml"),
            vec![
                err(9, 1, Some("b"), "two"),
                err(3, 5, Some("a"), "one"),
                err(9, 1, Some("b"), "two"),
            ],
        );
        assert_eq!(
            errors.report(),
            "error: `fleet.yaml` is not valid (2 problems)\n\
             fleet.yaml:3:5: agent \"a\": one\n\
             fleet.yaml:9:1: agent \"b\": two\n\
             hint: fix each problem at the line and column shown; README.md documents every fleet.yaml field\n"
        );
        let one = ConfigErrors::invalid(Path::new("f.yaml"), vec![err(1, 1, None, "x")]);
        assert_eq!(one.headline(), "`f.yaml` is not valid (1 problem)");
    }

    #[test]
    fn unreadable_report_names_cause_and_hint() {
        let errors = ConfigErrors::unreadable(
            Path::new("fleet.yaml"),
            io::Error::from(io::ErrorKind::NotFound),
        );
        let report = errors.report();
        assert!(
            report.starts_with("error: cannot read `fleet.yaml`\ncaused by: "),
            "{report}"
        );
        assert!(report.ends_with(
            "hint: run from the directory that holds `fleet.yaml`, or name the fleet file with `-f PATH`\n"
        ));
    }
}
