//! The plugin builder: a name, a version and a table of typed methods.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::rc::Rc;

use aurora_protocol::{Encoding, ErrorKind, MethodInfo, Payload, RemoteError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::{Cancelled, Context};

/// An error a handler returns; the caller receives its kind and message.
///
/// Any `std::error::Error` converts into it with `?`, as a
/// [`ErrorKind::Failed`] error carrying the error's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// A handler failure with a message for the caller.
    pub fn msg(message: impl fmt::Display) -> Error {
        Error {
            kind: ErrorKind::Failed,
            message: message.to_string(),
        }
    }

    /// An error of a specific kind, such as [`ErrorKind::BadRequest`].
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Error {
        Error {
            kind,
            message: message.to_string(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(err: E) -> Error {
        Error::msg(err)
    }
}

impl From<Error> for RemoteError {
    fn from(err: Error) -> RemoteError {
        RemoteError {
            kind: err.kind,
            message: err.message,
        }
    }
}

/// `Cancelled` converts with its own kind, not as a generic failure.
impl From<Cancelled> for Error {
    fn from(cancelled: Cancelled) -> Error {
        let kind = match cancelled.by_deadline() {
            true => ErrorKind::DeadlineExceeded,
            false => ErrorKind::Cancelled,
        };
        Error::new(kind, cancelled)
    }
}

pub(crate) type HandlerResult = Result<Payload, RemoteError>;
pub(crate) type LocalFuture = Pin<Box<dyn Future<Output = HandlerResult>>>;

type SyncHandler = dyn Fn(&Context, &Payload) -> HandlerResult;
type AsyncHandler = dyn Fn(Context, &Payload) -> LocalFuture;

/// A registered method, with its types erased.
pub(crate) enum Handler {
    /// Runs to completion on the plugin's thread as soon as the call arrives.
    Sync(Box<SyncHandler>),
    /// Runs as its own task, so other calls proceed while it waits.
    Async(Rc<AsyncHandler>),
}

/// A plugin under construction: register methods, then [`Plugin::run`].
pub struct Plugin {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) methods: HashMap<String, Handler>,
    pub(crate) infos: Vec<MethodInfo>,
}

impl Plugin {
    /// Starts a plugin called `name` at `version` (a semver string; most
    /// plugins pass `env!("CARGO_PKG_VERSION")`).
    pub fn new(name: &str, version: &str) -> Plugin {
        Plugin {
            name: name.to_owned(),
            version: version.to_owned(),
            methods: HashMap::new(),
            infos: Vec::new(),
        }
    }

    /// Registers a synchronous method.
    ///
    /// The request is decoded from whichever encoding the caller used, and the
    /// response is encoded in the same one. The handler runs on the plugin's
    /// only thread: keep it short, or use [`Plugin::method_async`].
    ///
    /// # Panics
    ///
    /// If a method called `name` is already registered.
    pub fn method<Req, Resp, F>(mut self, name: &str, handler: F) -> Plugin
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: Fn(&Context, Req) -> Result<Resp, Error> + 'static,
    {
        let erased = move |ctx: &Context, payload: &Payload| {
            let request = decode_request::<Req>(payload)?;
            let response = handler(ctx, request).map_err(RemoteError::from)?;
            encode_response(payload.encoding, &response)
        };
        self.register::<Req, Resp>(name, Handler::Sync(Box::new(erased)));
        self
    }

    /// Registers an asynchronous method; each call runs as its own task.
    ///
    /// # Panics
    ///
    /// If a method called `name` is already registered.
    pub fn method_async<Req, Resp, F, Fut>(mut self, name: &str, handler: F) -> Plugin
    where
        Req: DeserializeOwned + 'static,
        Resp: Serialize + 'static,
        F: Fn(Context, Req) -> Fut + 'static,
        Fut: Future<Output = Result<Resp, Error>> + 'static,
    {
        let handler = Rc::new(handler);
        let erased = move |ctx: Context, payload: &Payload| -> LocalFuture {
            let encoding = payload.encoding;
            let request = decode_request::<Req>(payload);
            let handler = Rc::clone(&handler);
            Box::pin(async move {
                let response = handler(ctx, request?).await.map_err(RemoteError::from)?;
                encode_response(encoding, &response)
            })
        };
        self.register::<Req, Resp>(name, Handler::Async(Rc::new(erased)));
        self
    }

    fn register<Req, Resp>(&mut self, name: &str, handler: Handler) {
        let previous = self.methods.insert(name.to_owned(), handler);
        assert!(previous.is_none(), "method {name:?} registered twice");
        self.infos.push(MethodInfo {
            name: name.to_owned(),
            request: std::any::type_name::<Req>().to_owned(),
            response: std::any::type_name::<Resp>().to_owned(),
        });
    }

    /// Serves calls until the supervisor says `Shutdown`, the socket closes or
    /// SIGTERM arrives.
    ///
    /// Returns success after a clean shutdown. When the process was not
    /// started by a supervisor, the handshake is refused, or the socket breaks,
    /// it prints why on stderr (which the supervisor captures) and returns
    /// failure.
    pub fn run(self) -> ExitCode {
        match crate::serve::serve(self) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                // stderr is the one channel left that is sure to reach a person.
                eprintln!("aurora plugin: {err}");
                ExitCode::FAILURE
            }
        }
    }
}

fn decode_request<Req: DeserializeOwned>(payload: &Payload) -> Result<Req, RemoteError> {
    payload.decode().map_err(|err| RemoteError {
        kind: ErrorKind::BadRequest,
        message: format!("request is not a {}: {err}", std::any::type_name::<Req>()),
    })
}

fn encode_response<Resp: Serialize>(encoding: Encoding, response: &Resp) -> HandlerResult {
    Payload::encode(encoding, response).map_err(|err| RemoteError {
        kind: ErrorKind::Failed,
        message: format!("cannot encode the response: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_convert_with_the_right_kind() {
        let io = std::io::Error::other("disk on fire");
        let err: Error = io.into();
        assert_eq!(err.kind(), ErrorKind::Failed);
        assert_eq!(RemoteError::from(err).message, "disk on fire");

        let from_deadline: Error = Cancelled::new(true).into();
        assert_eq!(from_deadline.kind(), ErrorKind::DeadlineExceeded);
        let from_cancel: Error = Cancelled::new(false).into();
        assert_eq!(from_cancel.kind(), ErrorKind::Cancelled);
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_method_name_is_registered_once() {
        let ok = |_: &Context, (): ()| -> Result<(), Error> { Ok(()) };
        let _ = Plugin::new("p", "1.0.0").method("m", ok).method("m", ok);
    }
}
