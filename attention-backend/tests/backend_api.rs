//! The run-time backend API: device selection and the CPU arm against `cpu::forward`.

mod common;

use attention_backend::ndarray::{Array2, Array3};
use attention_backend::{
    cpu, AttentionError, AttentionParams, Backend, Device, DeviceRequest, KvCache, SlotMapping, Tensor,
};
use common::{build, Spec};

#[test]
fn device_requests_parse() {
    assert_eq!("".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
    assert_eq!(" AUTO ".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
    assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
    assert_eq!("cuda".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda { ordinal: 0 });
    assert_eq!("cuda:3".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda { ordinal: 3 });
    for bad in ["tpu", "cuda:", "cuda:x", "cpu:0"] {
        assert!(matches!(bad.parse::<DeviceRequest>(), Err(AttentionError::InvalidArgument { .. })), "{bad}");
    }
}

#[test]
fn cpu_request_gives_cpu() {
    let b = Backend::select(DeviceRequest::Cpu).unwrap();
    assert_eq!(b.device(), Device::Cpu);
    assert_eq!(b.cuda_ordinal(), None);
    assert!(b.name().starts_with("cpu"));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_typed_error() {
    assert_eq!(Backend::cuda(0).unwrap_err(), AttentionError::CudaNotCompiled);
    assert_eq!(Backend::select(DeviceRequest::Cuda { ordinal: 0 }).unwrap_err(), AttentionError::CudaNotCompiled);
    assert_eq!(Backend::select(DeviceRequest::Auto).unwrap().device(), Device::Cpu);
}

#[cfg(feature = "cuda")]
#[test]
fn auto_never_fails() {
    // CUDA where a device is visible, the CPU otherwise.
    let b = Backend::select(DeviceRequest::Auto).unwrap();
    let visible = attention_backend::cuda::CudaDevice::count();
    assert_eq!(b.device() == Device::Cuda, visible > 0);
    if visible == 0 {
        // No driver or no device: a typed error, not a panic inside cudarc.
        assert!(matches!(Backend::cuda(0), Err(AttentionError::NoCudaDevice { .. })));
    }
    assert!(matches!(Backend::cuda(visible), Err(AttentionError::NoCudaDevice { .. })));
}

/// The unified API on the CPU gives bit for bit what `cpu::forward` gives.
#[test]
fn unified_forward_equals_cpu_forward() {
    let p = AttentionParams::new(8, 2, 64).with_softcap(Some(30.0)).with_sliding_window(40);
    let spec = Spec::new(vec![(1, 50), (1, 3), (20, 90), (7, 7)], 16, 512, p.clone()).seed(11);
    let mut direct = build::<f32>(&spec);
    let n = direct.meta.num_tokens();
    let mut out_direct = Array3::<f32>::from_elem((n, 8, 64), f32::NAN);
    let mut lse_direct = Array2::<f32>::from_elem((n, 8), f32::NAN);

    let backend = Backend::cpu();
    let b = build::<f32>(&spec);
    let mut cache: KvCache<f32> = backend.kv_cache_from_host(b.cache).unwrap();
    let step = backend.prepare_step(b.meta.clone()).unwrap();
    let (q, k, v) =
        (backend.tensor(b.query).unwrap(), backend.tensor(b.key).unwrap(), backend.tensor(b.value).unwrap());
    let mut out = backend.tensor(Array3::<f32>::from_elem((n, 8, 64), f32::NAN)).unwrap();
    let mut lse = backend.tensor(Array2::<f32>::from_elem((n, 8), f32::NAN)).unwrap();
    backend
        .forward(
            &step,
            &p,
            attention_backend::ForwardTensors {
                query: &q,
                key: &k,
                value: &v,
                cache: &mut cache,
                out: &mut out,
                lse: Some(&mut lse),
            },
        )
        .unwrap();

    cpu::forward(
        &direct.meta,
        &p,
        cpu::ForwardIo {
            query: direct.query.view(),
            key: direct.key.view(),
            value: direct.value.view(),
            cache: &mut direct.cache,
            out: out_direct.view_mut(),
            lse: Some(lse_direct.view_mut()),
        },
    )
    .unwrap();
    let bits = |a: &[f32]| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let out = backend.to_host(&out).unwrap();
    let lse = backend.to_host(&lse).unwrap();
    assert_eq!(bits(out.as_slice().unwrap()), bits(out_direct.as_slice().unwrap()));
    assert_eq!(bits(lse.as_slice().unwrap()), bits(lse_direct.as_slice().unwrap()));
    let host_cache = backend.kv_cache_to_host(&cache).unwrap();
    let bits4 = |a: attention_backend::ndarray::ArrayView4<'_, f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits4(host_cache.key()), bits4(direct.cache.key()));
    assert_eq!(bits4(host_cache.value()), bits4(direct.cache.value()));
}

#[test]
fn unified_kv_cache_update_and_errors() {
    let backend = Backend::cpu();
    let layout = attention_backend::CacheLayout::new(4, 16, 2, 8).unwrap();
    let mut cache = backend.kv_cache::<f32>(layout).unwrap();
    let key = backend.tensor(Array3::<f32>::from_elem((2, 2, 8), 1.0)).unwrap();
    let value = backend.tensor(Array3::<f32>::from_elem((2, 2, 8), 2.0)).unwrap();
    let slots = backend.slot_mapping(SlotMapping::new(vec![17, -1])).unwrap();
    backend.kv_cache_update(&key, &value, &mut cache, &slots).unwrap();
    let host = cache.as_cpu().unwrap();
    assert_eq!(host.key()[[1, 1, 0, 0]], 1.0);
    assert_eq!(host.value()[[1, 1, 1, 7]], 2.0);

    // A 2-D key (heads flattened) is refused by the shared validation with a shape error.
    let flat = Tensor::from_array(Array2::<f32>::zeros((2, 16)));
    let r = backend.kv_cache_update(&flat, &value, &mut cache, &slots);
    assert!(matches!(r, Err(AttentionError::ShapeMismatch { tensor: "key", .. })));
    // A slot past the cache.
    let slots = backend.slot_mapping(SlotMapping::new(vec![64, 0])).unwrap();
    let r = backend.kv_cache_update(&key, &value, &mut cache, &slots);
    assert!(matches!(r, Err(AttentionError::SlotOutOfRange { .. })));
}

#[test]
fn unified_forward_refuses_bad_shapes() {
    let p = AttentionParams::new(4, 2, 16);
    let spec = Spec::new(vec![(3, 9)], 4, 64, p.clone());
    let b = build::<f32>(&spec);
    let backend = Backend::cpu();
    let mut cache = backend.kv_cache_from_host(b.cache).unwrap();
    let step = backend.prepare_step(b.meta.clone()).unwrap();
    let n = b.meta.num_tokens();
    let q = Tensor::from_array(b.query);
    let (k, v) = (Tensor::from_array(b.key), Tensor::from_array(b.value));
    let mut out = Tensor::from_array(Array2::<f32>::zeros((n, 4 * 16)));
    let r = backend.forward(
        &step,
        &p,
        attention_backend::ForwardTensors {
            query: &q,
            key: &k,
            value: &v,
            cache: &mut cache,
            out: &mut out,
            lse: None,
        },
    );
    assert!(matches!(r, Err(AttentionError::ShapeMismatch { tensor: "out", .. })));
}
