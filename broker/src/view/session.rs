//! Launches and sessions of the web view, in memory.
//!
//! A launch is what the EHR asked for: who (the calling system and the person its token speaks
//! for) and which patient. It is named by an unguessable code, the only thing in the launch URL,
//! and it works once, within `launch_ttl`: opening it removes it and starts a session. A session
//! is named by another unguessable id, carried only in an `HttpOnly` cookie, and lasts
//! `session_ttl` from its launch. Both are bound to their requester and patient: nothing the
//! browser sends afterwards can name another patient or person.
//!
//! Expiry is checked here against the instant each was made, not left to the cache's eviction
//! timing, so an expired launch is refused as expired, deterministically.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use carerecord_adapters::NhsNumber;
use carerecord_proto::Requester;
use ring::rand::{SecureRandom, SystemRandom};

use crate::access::Caller;

/// Most launches and sessions held at once: beyond this the oldest are forgotten (their users
/// launch again), so a flood of launches cannot grow memory without bound.
const MAX_ENTRIES: u64 = 100_000;

/// Who asked, for which patient: what a launch and its session are bound to.
#[derive(Debug, Clone)]
pub struct Binding {
    pub caller: Caller,
    pub requester: Requester,
    pub nhs_number: NhsNumber,
}

struct Launch {
    binding: Binding,
    made: Instant,
}

/// One clinician's view of one patient.
pub struct Session {
    pub binding: Binding,
    /// Must come back with every form this session posts.
    pub csrf: String,
    made: Instant,
    /// The next lookup asks every organisation again ("Ask every organisation again").
    fresh_next: AtomicBool,
}

impl Session {
    /// Whether the next lookup must skip the cache; asking clears it.
    pub fn take_fresh(&self) -> bool {
        self.fresh_next.swap(false, Ordering::Relaxed)
    }

    pub fn want_fresh(&self) {
        self.fresh_next.store(true, Ordering::Relaxed);
    }

    /// Whether `token` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, token: &str) -> bool {
        token.len() == self.csrf.len()
            && token
                .bytes()
                .zip(self.csrf.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// Why a launch URL did not open a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LaunchRefused {
    #[error("this link has already been used, or was never issued")]
    UsedOrUnknown,
    #[error("this link has expired")]
    Expired,
}

impl LaunchRefused {
    pub fn reason(self) -> &'static str {
        match self {
            LaunchRefused::UsedOrUnknown => "LAUNCH_USED_OR_UNKNOWN",
            LaunchRefused::Expired => "LAUNCH_EXPIRED",
        }
    }
}

/// The launches waiting to be opened and the sessions open now.
pub struct Sessions {
    launches: moka::sync::Cache<String, Arc<Launch>>,
    sessions: moka::sync::Cache<String, Arc<Session>>,
    launch_ttl: Duration,
    session_ttl: Duration,
    random: SystemRandom,
}

impl Sessions {
    pub fn new(launch_ttl: Duration, session_ttl: Duration) -> Sessions {
        // The caches forget a little after expiry; the check below decides.
        let keep = |ttl: Duration| ttl + Duration::from_secs(1);
        Sessions {
            launches: moka::sync::Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(keep(launch_ttl))
                .build(),
            sessions: moka::sync::Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(keep(session_ttl))
                .build(),
            launch_ttl,
            session_ttl,
            random: SystemRandom::new(),
        }
    }

    pub fn launch_ttl(&self) -> Duration {
        self.launch_ttl
    }

    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// 256 random bits, hex.
    fn new_id(&self) -> Option<String> {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).ok()?;
        Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A new launch for `binding`: its code, for the launch URL. `None` only if the system's
    /// random number generator fails.
    pub fn launch(&self, binding: Binding) -> Option<String> {
        let code = self.new_id()?;
        self.launches.insert(
            code.clone(),
            Arc::new(Launch {
                binding,
                made: Instant::now(),
            }),
        );
        Some(code)
    }

    /// Opens a launch, once: the session's id and the session.
    pub fn open(&self, code: &str) -> Result<(String, Arc<Session>), LaunchRefused> {
        if !is_id(code) {
            return Err(LaunchRefused::UsedOrUnknown);
        }
        let launch = self
            .launches
            .remove(code)
            .ok_or(LaunchRefused::UsedOrUnknown)?;
        if launch.made.elapsed() >= self.launch_ttl {
            return Err(LaunchRefused::Expired);
        }
        let (Some(id), Some(csrf)) = (self.new_id(), self.new_id()) else {
            return Err(LaunchRefused::UsedOrUnknown);
        };
        let session = Arc::new(Session {
            binding: launch.binding.clone(),
            csrf,
            made: launch.made,
            fresh_next: AtomicBool::new(false),
        });
        self.sessions.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The session `id` names, while it lasts.
    pub fn session(&self, id: &str) -> Option<Arc<Session>> {
        if !is_id(id) {
            return None;
        }
        let session = self.sessions.get(id)?;
        if session.made.elapsed() >= self.session_ttl {
            self.sessions.invalidate(id);
            return None;
        }
        Some(session)
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            caller: Caller {
                system: "ehr".into(),
                trusted_assertions: false,
            },
            requester: Requester::default(),
            nhs_number: NhsNumber::parse("9434765919").expect("valid"),
        }
    }

    #[test]
    fn a_launch_opens_once_and_its_session_is_bound_to_it() {
        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(60));
        let code = sessions.launch(binding()).expect("a code");
        let (id, session) = sessions.open(&code).expect("opens");
        assert_eq!(session.binding.nhs_number, binding().nhs_number);
        assert_eq!(
            sessions.open(&code).err(),
            Some(LaunchRefused::UsedOrUnknown),
            "a replay is refused"
        );
        assert!(sessions.session(&id).is_some());
        assert!(sessions.session(&code).is_none(), "a code is not a session");
        assert_ne!(id, session.csrf);
        assert!(session.csrf_matches(&session.csrf.clone()));
        assert!(!session.csrf_matches("nope"));
    }

    #[test]
    fn an_expired_launch_is_refused_as_expired() {
        let sessions = Sessions::new(Duration::ZERO, Duration::from_secs(60));
        let code = sessions.launch(binding()).expect("a code");
        assert_eq!(sessions.open(&code).err(), Some(LaunchRefused::Expired));
    }

    #[test]
    fn a_session_ends_with_its_ttl() {
        let sessions = Sessions::new(Duration::from_secs(60), Duration::ZERO);
        let code = sessions.launch(binding()).expect("a code");
        let (id, _) = sessions.open(&code).expect("opens");
        assert!(sessions.session(&id).is_none());
    }
}
