//! Root context: one per VM (each worker, plus the main thread). It creates the VM's
//! [`Plugin`] from the configuration and forwards the timer and call answers to it.

use super::ffi::ProxyWasm;
use super::http::Http;
use crate::envoy::Envoy;
use crate::plugin::Plugin;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

pub type Shared = Rc<RefCell<Plugin<ProxyWasm>>>;

pub struct Root {
    seed: u64,
    plugin: Option<Shared>,
    /// `on_done` was called.
    stopping: bool,
}

impl Root {
    pub fn new() -> Root {
        // Entropy from the host (WASI random_get behind RandomState) and the clock.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(ProxyWasm.now_us());
        Root {
            seed: h.finish(),
            plugin: None,
            stopping: false,
        }
    }

    /// Runs `f` on the plugin unless it is busy (a host call re-entered the VM).
    fn with(&self, f: impl FnOnce(&mut Plugin<ProxyWasm>)) {
        if let Some(p) = &self.plugin {
            match p.try_borrow_mut() {
                Ok(mut p) => f(&mut p),
                Err(_) => log::error!("registry-lb: re-entrant root callback ignored"),
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let mut finished = false;
        self.with(|p| {
            p.on_call_answer(token, num_headers, body_size);
            finished = self.stopping && p.leaving_done();
        });
        if finished {
            // The deregistrations are answered: Envoy may delete this context now.
            let _ = hostcalls::done();
        }
    }

    /// Envoy stops or the configuration is removed: deregister (best effort: Envoy
    /// may not wait for the answers; the registration's TTL is the guarantee).
    fn on_done(&mut self) -> bool {
        self.stopping = true;
        let mut done = true;
        self.with(|p| done = p.on_done());
        done
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = if size == 0 {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let plugin = match Plugin::configure(ProxyWasm, &bytes, self.seed) {
            Ok(p) => p,
            Err(e) => {
                log::error!("registry-lb: {e}");
                return false;
            }
        };
        let tick = plugin.tick_ms();
        self.plugin = Some(Rc::new(RefCell::new(plugin)));
        if let Err(e) = hostcalls::set_tick_period(Duration::from_millis(tick)) {
            log::error!("registry-lb: cannot start the timer: {e:?}");
            return false;
        }
        true
    }

    fn on_tick(&mut self) {
        self.with(|p| p.on_tick());
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        if let Ok(mut p) = plugin.try_borrow_mut() {
            p.mark_serving();
        }
        Some(Box::new(Http::new(id, plugin)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
