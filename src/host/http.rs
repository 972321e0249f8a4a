//! Per-request context: forwards the request's callbacks to the VM's plugin and keeps
//! what the routing needs to remember until the request ends.

use super::root::Shared;
use crate::plugin::{Action as Decision, Routed};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

pub struct Http {
    id: u32,
    plugin: Shared,
    /// The routing of this request, to account for when it ends.
    routed: Option<Routed>,
}

impl Http {
    pub fn new(id: u32, plugin: Shared) -> Http {
        Http {
            id,
            plugin,
            routed: None,
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let Ok(mut p) = self.plugin.try_borrow_mut() else {
            log::error!("registry-lb: re-entrant request callback: not routed");
            return Action::Continue;
        };
        let (decision, routed) = p.on_request_headers(self.id);
        self.routed = routed;
        match decision {
            Decision::Continue => Action::Continue,
            Decision::Pause => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let Ok(mut p) = self.plugin.try_borrow_mut() {
            p.on_response_headers(self.id, self.routed.as_ref());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Ok(mut p) = self.plugin.try_borrow_mut() {
            p.on_log(self.id, self.routed.take());
        }
    }
}
