//! The config Secret (`<name>-config`): configuration files the API server reads (the
//! egress selector that sends node traffic through konnectivity).

use futures::future::BoxFuture;

use crate::controlplane::pipeline::{Flow, State, Step, Tenant};
use crate::controlplane::render;
use crate::error::Error;
use crate::kube::Files;

/// The config Secret.
pub struct ConfigSecret;

impl Step for ConfigSecret {
    fn name(&self) -> &'static str {
        "config"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(async move {
            let config = Files::from([(
                render::EGRESS_SELECTOR_KEY.to_string(),
                render::EGRESS_SELECTOR.as_bytes().to_vec(),
            )]);
            let name = s.t.names().config;
            if s.t.read_secret(&name).await? != config {
                s.t.apply_secret(&name, &config).await?;
            }
            s.config = Some(config);
            Ok(Flow::Next)
        })
    }

    fn cleanup<'a>(&'a self, t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        Some(Box::pin(
            async move { t.delete_secret(&t.names().config).await },
        ))
    }
}
