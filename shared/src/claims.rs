//! The claims inside a tabgrid token (HS256 JWT): who the bearer is and what they may do.
//! Signing and checking live in the coordinator; this is only the shape both sides read.

use serde::{Deserialize, Serialize};

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including every job and `/workers`.
    Admin,
    /// Submits jobs and reads or deletes its own.
    Submitter,
    /// Lends compute over `/api/v1/worker`; nothing else.
    Volunteer,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Volunteer => "volunteer",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "submitter" => Some(Role::Submitter),
            "volunteer" => Some(Role::Volunteer),
            _ => None,
        }
    }
}

/// Registered and private claims of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the user or volunteer name; job ownership is by subject.
    pub sub: String,
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
}
