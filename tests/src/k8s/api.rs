//! A blocking client for test code: the harness is synchronous, so it owns a small runtime and
//! drives kube-rs with it. Objects are written as JSON with server-side apply, as `kubectl apply
//! --server-side` does, so the API server defaults and validates them exactly as it would a user's.
use std::{future::Future, path::Path, time::Duration};

use kube::{
    Client, Config,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, GroupVersionKind},
};
use serde_json::Value;

use super::{K8sError, err};

/// The field manager of everything the harness writes.
const MANAGER: &str = "dpt-harness";

#[derive(Clone)]
pub struct Api {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    client: Client,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Api")
    }
}

/// The resource of an object by its `apiVersion` and `kind` (the kinds the harness writes).
fn resource(api_version: &str, kind: &str) -> Result<(ApiResource, bool), K8sError> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (plural, namespaced) = match kind {
        "Service" => ("services", true),
        "Pod" => ("pods", true),
        "EndpointSlice" => ("endpointslices", true),
        "ConfigMap" => ("configmaps", true),
        "ServiceAccount" => ("serviceaccounts", true),
        "Node" => ("nodes", false),
        "Namespace" => ("namespaces", false),
        other => return Err(err(format!("the harness does not write {other} objects"))),
    };
    Ok((ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural), namespaced))
}

impl Api {
    pub fn connect(kubeconfig: &Path) -> Result<Api, K8sError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| err(format!("runtime: {e}")))?;
        let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| err(format!("{}: {e}", kubeconfig.display())))?;
        let client = rt.block_on(async {
            let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(|e| err(format!("kubeconfig: {e}")))?;
            config.read_timeout = Some(Duration::from_secs(30));
            Client::try_from(config).map_err(|e| err(format!("client: {e}")))
        })?;
        Ok(Api { rt: std::sync::Arc::new(rt), client })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Whether `/readyz` answers `ok`.
    pub fn readyz(&self) -> bool {
        let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
        self.block_on(async { tokio::time::timeout(Duration::from_secs(2), self.client.request_text(req)).await })
            .is_ok_and(|r| r.is_ok_and(|t| t.trim() == "ok"))
    }

    fn dynamic(&self, obj: &Value) -> Result<(kube::Api<DynamicObject>, String), K8sError> {
        let api_version = obj["apiVersion"].as_str().ok_or_else(|| err("object without apiVersion"))?;
        let kind = obj["kind"].as_str().ok_or_else(|| err("object without kind"))?;
        let name = obj["metadata"]["name"].as_str().ok_or_else(|| err(format!("{kind} without a name")))?.to_owned();
        let (ar, namespaced) = resource(api_version, kind)?;
        let api = match obj["metadata"]["namespace"].as_str() {
            Some(ns) if namespaced => kube::Api::namespaced_with(self.client.clone(), ns, &ar),
            _ => kube::Api::all_with(self.client.clone(), &ar),
        };
        Ok((api, name))
    }

    /// Creates or updates `obj` (server-side apply) and returns it as the server stored it.
    pub fn apply(&self, obj: &Value) -> Result<Value, K8sError> {
        let (api, name) = self.dynamic(obj)?;
        let kind = obj["kind"].as_str().unwrap_or_default();
        let out = self
            .block_on(api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj)))
            .map_err(|e| err(format!("apply {kind} {name}: {e}")))?;
        serde_json::to_value(out).map_err(|e| err(format!("{kind} {name}: {e}")))
    }

    /// Merges `status` into the object's status subresource, as a kubelet (or a cloud
    /// controller, for a LoadBalancer) does.
    pub fn patch_status(&self, obj: &Value, status: Value) -> Result<(), K8sError> {
        let (api, name) = self.dynamic(obj)?;
        self.block_on(api.patch_status(&name, &PatchParams::default(), &Patch::Merge(serde_json::json!({ "status": status }))))
            .map(drop)
            .map_err(|e| err(format!("patch status of {name}: {e}")))
    }

    /// Deletes the object named by `obj`'s apiVersion, kind, namespace and name; `grace`
    /// seconds for a Pod. Absent is fine.
    pub fn delete(&self, obj: &Value, grace: Option<u32>) -> Result<(), K8sError> {
        let (api, name) = self.dynamic(obj)?;
        let dp = DeleteParams { grace_period_seconds: grace, ..DeleteParams::default() };
        match self.block_on(api.delete(&name, &dp)) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(err(format!("delete {name}: {e}"))),
        }
    }

    /// The cluster-scoped objects of `kind` matching `selector`.
    pub fn list_cluster(&self, api_version: &str, kind: &str, selector: &str) -> Result<Vec<Value>, K8sError> {
        let (ar, _) = resource(api_version, kind)?;
        let api: kube::Api<DynamicObject> = kube::Api::all_with(self.client.clone(), &ar);
        let list = self.block_on(api.list(&ListParams::default().labels(selector))).map_err(|e| err(format!("list {kind}: {e}")))?;
        list.items.into_iter().map(|o| serde_json::to_value(o).map_err(|e| err(e.to_string()))).collect()
    }

    /// The objects of `kind` in `namespace` matching `selector`.
    pub fn list(&self, api_version: &str, kind: &str, namespace: &str, selector: &str) -> Result<Vec<Value>, K8sError> {
        let (ar, _) = resource(api_version, kind)?;
        let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(self.client.clone(), namespace, &ar);
        let list = self.block_on(api.list(&ListParams::default().labels(selector))).map_err(|e| err(format!("list {kind}: {e}")))?;
        list.items.into_iter().map(|o| serde_json::to_value(o).map_err(|e| err(e.to_string()))).collect()
    }
}
