use super::*;
use std::sync::atomic::AtomicU32;

/// An upstream that answers each attempt from a script (the last entry repeats) and counts.
#[derive(Clone)]
struct Scripted {
    script: Arc<Vec<Result<u16, &'static str>>>,
    calls: Arc<AtomicU32>,
}

impl Scripted {
    fn new(script: Vec<Result<u16, &'static str>>) -> Self {
        Self {
            script: Arc::new(script),
            calls: Arc::default(),
        }
    }
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Service<Request<ReqBody>> for Scripted {
    type Response = Response<()>;
    type Error = ProxyError;
    type Future = std::future::Ready<Result<Response<()>, ProxyError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        assert!(req.extensions().get::<Tried>().is_some());
        let n = self.calls.fetch_add(1, Ordering::Relaxed) as usize;
        let step = self.script[n.min(self.script.len() - 1)];
        std::future::ready(match step {
            Ok(status) => {
                let mut r = Response::new(());
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok(r)
            }
            Err("connect") => Err(ProxyError::Connect {
                addr: ([127, 0, 0, 1], 1).into(),
                reason: "refused".into(),
            }),
            Err("refused") => Err(ProxyError::Refused("REFUSED_STREAM".into())),
            Err(_) => Err(ProxyError::Upstream("reset".into())),
        })
    }
}

fn cfg(on: &[&str]) -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        on: RetryOn {
            any_5xx: on.contains(&"5xx"),
            connect_failure: on.contains(&"connect-failure"),
            refused_stream: on.contains(&"refused-stream"),
            reset: on.contains(&"reset"),
            grpc_codes: if on.contains(&"unavailable") {
                vec![14]
            } else {
                vec![]
            },
            ..Default::default()
        },
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
        budget_percent: 20.0,
        budget_min_per_second: 10,
        non_idempotent: false,
    }
}

fn req(method: Method) -> Request<ReqBody> {
    let mut r = Request::new(ReqBody::Empty);
    *r.method_mut() = method;
    r
}

async fn run(
    c: RetryConfig,
    up: &Scripted,
    r: Request<ReqBody>,
) -> Result<Response<()>, ProxyError> {
    RetryLayer::new(Some(c), None, Arc::default())
        .layer(up.clone())
        .oneshot(r)
        .await
}

#[tokio::test(start_paused = true)]
async fn retries_5xx_until_success_or_max() {
    let up = Scripted::new(vec![Ok(503), Ok(500), Ok(200)]);
    let r = run(cfg(&["5xx"]), &up, req(Method::GET)).await.unwrap();
    assert_eq!((r.status().as_u16(), up.calls()), (200, 3));

    let up = Scripted::new(vec![Ok(503)]);
    let r = run(cfg(&["5xx"]), &up, req(Method::GET)).await.unwrap();
    assert_eq!((r.status().as_u16(), up.calls()), (503, 4), "1 + 3 retries");

    // Conditions not listed are not retried.
    let up = Scripted::new(vec![Ok(503)]);
    run(cfg(&["connect-failure"]), &up, req(Method::GET))
        .await
        .unwrap();
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn post_is_retried_only_when_it_never_reached_the_upstream() {
    let c = cfg(&["5xx", "reset", "connect-failure", "refused-stream"]);
    for (script, want) in [
        (Err("reset"), 1),
        (Ok(502), 1),
        (Err("connect"), 4),
        (Err("refused"), 4),
    ] {
        let up = Scripted::new(vec![script]);
        let _ = run(c.clone(), &up, req(Method::POST)).await;
        assert_eq!(up.calls(), want, "{script:?}");
    }
    // An Idempotency-Key, or the policy's opt-in, makes POST retryable on 5xx.
    let up = Scripted::new(vec![Ok(502)]);
    let mut r = req(Method::POST);
    r.headers_mut()
        .insert("idempotency-key", "k1".parse().unwrap());
    let _ = run(c.clone(), &up, r).await;
    assert_eq!(up.calls(), 4);
    let up = Scripted::new(vec![Ok(502)]);
    let _ = run(
        RetryConfig {
            non_idempotent: true,
            ..c
        },
        &up,
        req(Method::POST),
    )
    .await;
    assert_eq!(up.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn grpc_codes_the_policy_lists_are_retried() {
    #[derive(Clone)]
    struct Grpc(Arc<AtomicU32>);
    impl Service<Request<ReqBody>> for Grpc {
        type Response = Response<()>;
        type Error = ProxyError;
        type Future = std::future::Ready<Result<Response<()>, ProxyError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<ReqBody>) -> Self::Future {
            let n = self.0.fetch_add(1, Ordering::Relaxed);
            let mut r = Response::new(());
            let code = if n == 0 { "14" } else { "0" };
            r.headers_mut().insert("grpc-status", code.parse().unwrap());
            std::future::ready(Ok(r))
        }
    }
    let calls = Arc::new(AtomicU32::new(0));
    let mut r = req(Method::POST);
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let resp = RetryLayer::new(Some(cfg(&["unavailable"])), None, Arc::default())
        .layer(Grpc(calls.clone()))
        .oneshot(r)
        .await
        .unwrap();
    assert_eq!(resp.headers()["grpc-status"], "0");
    assert_eq!(calls.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_retries_during_an_outage() {
    let budget = Arc::new(Budget::default());
    let c = RetryConfig {
        budget_percent: 20.0,
        budget_min_per_second: 0,
        ..cfg(&["5xx"])
    };
    let up = Scripted::new(vec![Ok(503)]);
    let svc = RetryLayer::new(Some(c), None, budget.clone()).layer(up.clone());
    for _ in 0..500 {
        let _ = svc.clone().oneshot(req(Method::GET)).await;
    }
    let retries = up.calls() - 500;
    // 20% of 500 requests, not the 1,500 that 3 retries each would make.
    assert!((95..=100).contains(&retries), "{retries} retries");
    assert_eq!(budget.usage(), (500, u64::from(retries)));
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_and_is_capped() {
    let c = cfg(&["5xx"]);
    for _ in 0..100 {
        assert!(backoff(&c, 1) <= Duration::from_millis(25));
        assert!(backoff(&c, 3) <= Duration::from_millis(100));
        assert!(backoff(&c, 10) <= Duration::from_millis(250));
    }
    let up = Scripted::new(vec![Ok(503)]);
    let start = tokio::time::Instant::now();
    let _ = run(c, &up, req(Method::GET)).await;
    assert!(start.elapsed() <= Duration::from_millis(25 + 50 + 100));
}

/// An upstream whose first call stalls `stall`, later ones answer at once.
#[derive(Clone, Default)]
struct Stalls {
    calls: Arc<AtomicU32>,
}

impl Service<Request<ReqBody>> for Stalls {
    type Response = Response<()>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<()>, ProxyError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<ReqBody>) -> Self::Future {
        let first = self.calls.fetch_add(1, Ordering::Relaxed) == 0;
        Box::pin(async move {
            if first {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mut r = Response::new(());
            *r.status_mut() = if first {
                http::StatusCode::ACCEPTED
            } else {
                http::StatusCode::OK
            };
            Ok(r)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_idempotent_request_is_hedged_and_the_first_answer_wins() {
    let recent = Arc::new(Recent::default());
    let hedging = Hedging {
        cfg: HedgeConfig {
            delay: Some(Duration::from_millis(30)),
        },
        recent: recent.clone(),
    };
    let up = Stalls::default();
    let start = Instant::now();
    let r = RetryLayer::new(None, Some(hedging.clone()), Arc::default())
        .layer(up.clone())
        .oneshot(req(Method::GET))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the hedge's answer");
    assert_eq!(start.elapsed(), Duration::from_millis(30));
    assert_eq!((up.calls.load(Ordering::Relaxed), recent.total()), (2, 1));

    // A POST is not hedged: it waits for its one attempt.
    let up = Stalls::default();
    let r = RetryLayer::new(None, Some(hedging.clone()), Arc::default())
        .layer(up.clone())
        .oneshot(req(Method::POST))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(up.calls.load(Ordering::Relaxed), 1);

    // An empty budget (no floor, no share) sends no hedge.
    let mut none = RetryConfig::budget_only();
    none.budget_percent = 0.0;
    none.budget_min_per_second = 0;
    let up = Stalls::default();
    let mut layer = RetryLayer::new(None, Some(hedging), Arc::default());
    layer.cfg = Some(Arc::new(none));
    let r = layer
        .layer(up.clone())
        .oneshot(req(Method::GET))
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "waited for the stalled one");
    assert_eq!(up.calls.load(Ordering::Relaxed), 1);
}
