//! The keyvault primitive: `get_secret(agent, name)` resolves a secret in the
//! agent's own namespace of the configured backend. Owns reading secrets; must
//! never log, format or return a secret value in an error.

mod secret;

pub use secret::{InvalidSecretName, Secret, SecretName};

/// Where and why a secret could not be resolved. Messages name the place
/// (file, credential or variable) and a fix, never the value.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("secret `{name}` of agent \"{agent}\" not found: {location} does not exist")]
    NotFound {
        agent: String,
        name: String,
        location: String,
    },
    #[error("{0}")]
    Other(String),
}

/// A secret backend. Implementations resolve only inside `agent`'s namespace.
pub trait SecretStore: Send + Sync {
    fn get_secret(&self, agent: &str, name: &SecretName) -> Result<Secret, VaultError>;
}
