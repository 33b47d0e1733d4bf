"""Local features and their encodings: each formula checked by hand on tiny inputs, the learned state
stored in and reloaded from PostgreSQL, and the flat-image pitfall (no keypoints) on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.mixture import GaussianMixture

import imgdb
from imgdb.errors import ExtractorSpecError, ImgdbError
from imgdb.features import aggregate
from imgdb.features.codebook import CodebookExtractor
from imgdb.features.local import DESCRIPTOR_DIMS, describe_local
from imgdb.features.registry import canonical_spec
from imgdb.features.spec import parse_spec


def test_vlad_by_hand() -> None:
    centres = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    x = np.array([[1.0, 0.0], [2.0, 1.0], [9.0, 1.0]], dtype=np.float32)
    residuals = [np.array([3.0, 1.0]), np.array([-1.0, 1.0])]  # (1,0)+(2,1) and (9,1)-(10,0)
    intra = [r / np.linalg.norm(r) for r in residuals]
    signed_sqrt = np.concatenate([np.sign(v) * np.sqrt(np.abs(v)) for v in intra])
    np.testing.assert_allclose(aggregate.vlad(x, centres), signed_sqrt / np.linalg.norm(signed_sqrt), rtol=1e-6)


def test_vlad_of_nothing_is_zero() -> None:
    assert not aggregate.vlad(np.empty((0, 2), np.float32), np.eye(2, dtype=np.float32)).any()


def test_bow_tf_idf_by_hand() -> None:
    centres = np.array([[0.0], [5.0], [10.0]], dtype=np.float32)
    sets = [np.array([[0.1], [0.2], [9.0]]), np.array([[4.9]]), np.array([[0.3], [5.2]])]
    idf = aggregate.learn_idf(sets, centres)
    np.testing.assert_allclose(idf, np.log([3 / 2, 3 / 2, 3 / 1]), rtol=1e-6)
    np.testing.assert_allclose(aggregate.bow(sets[0], centres, idf), np.array([2, 0, 1]) / 3 * idf, rtol=1e-6)


def test_fisher_matches_a_direct_evaluation_of_the_formulas() -> None:
    rng = np.random.default_rng(0)
    k, d = 3, 4
    weights = np.array([0.5, 0.3, 0.2])
    means = rng.normal(size=(k, d))
    variances = rng.uniform(0.5, 2.0, size=(k, d))
    x = rng.normal(size=(25, d))
    # Posteriors from scikit-learn's own GMM: an independent implementation of γ_t(k).
    gmm = GaussianMixture(n_components=k, covariance_type="diag")
    gmm.weights_, gmm.means_, gmm.covariances_ = weights, means, variances
    gmm.precisions_cholesky_ = 1 / np.sqrt(variances)
    gamma = gmm.predict_proba(x)
    np.testing.assert_allclose(aggregate.posteriors(x, weights, means, variances), gamma, rtol=1e-6, atol=1e-12)
    n = len(x)
    u = np.zeros((k, d))
    v = np.zeros((k, d))
    for j in range(k):
        for t in range(n):
            z = (x[t] - means[j]) / np.sqrt(variances[j])
            u[j] += gamma[t, j] * z
            v[j] += gamma[t, j] * (z**2 - 1)
        u[j] /= n * np.sqrt(weights[j])
        v[j] /= n * np.sqrt(2 * weights[j])
    expected = np.concatenate([u.ravel(), v.ravel()])
    expected = np.sign(expected) * np.sqrt(np.abs(expected))
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(aggregate.fisher(x, weights, means, variances), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(DESCRIPTOR_DIMS))
def test_every_local_feature_on_a_real_photo(museum: Path, kind: str) -> None:
    image = Image.open(museum / "images" / "bbdd_00005.jpg").convert("RGB")
    descriptors = describe_local(image, kind, side=480, max_keypoints=300)
    assert descriptors.dtype == np.float32 and descriptors.shape[1] == DESCRIPTOR_DIMS[kind]
    assert 20 <= len(descriptors) <= (300 if kind not in ("kaze", "akaze") else 10**6)
    if kind == "rootsift":  # Hellinger mapping: unit L2 norm, non-negative
        np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1, rtol=1e-4)
        assert (descriptors >= 0).all()
    flat = describe_local(Image.new("RGB", (300, 200), (120, 90, 60)), kind, side=480, max_keypoints=300)
    assert flat.shape == (0, DESCRIPTOR_DIMS[kind])


@pytest.mark.parametrize(
    ("given", "canonical", "dim"),
    [
        ("vlad:rootsift", "vlad:rootsift/k=64/side=640/max=2000/dim=full", 8192),
        ("vlad:sift/k=8", "vlad:sift/k=8/side=640/max=2000", 1024),
        ("bow:orb/k=500", "bow:orb/k=500/side=640/max=2000", 500),
        ("fisher:sift/k=16", "fisher:sift/k=16/side=640/max=2000/ldim=64/dim=full", 2048),
        ("vlad:rootsift/dim=full", "vlad:rootsift/k=64/side=640/max=2000/dim=full", 8192),
        ("vlad:rootsift/dim=512", "vlad:rootsift/k=64/side=640/max=2000/dim=512", 512),
        ("vlad:rootsift/whiten", "vlad:rootsift/k=64/side=640/max=2000/dim=512/whiten", 512),
    ],
)
def test_codebook_specs(given: str, canonical: str, dim: int) -> None:
    extractor = CodebookExtractor.from_spec(parse_spec(given))
    assert canonical_spec(given) == extractor.spec == canonical
    assert extractor.dim == dim


@pytest.mark.parametrize(("given", "reason"), [("vlad:sift/dim=full/whiten", "whiten needs a reduction"),
                                               ("vlad:sift/k=8/dim=2000", "more than the 1024 dimensions"),
                                               ("vlad:sift/dim=all", "dim")])
def test_codebook_specs_refused(given: str, reason: str) -> None:
    with pytest.raises(ExtractorSpecError, match=reason):
        CodebookExtractor.from_spec(parse_spec(given))


@pytest.fixture(scope="module")
def sample_descriptors(museum_sample: Path) -> tuple[CodebookExtractor, list[np.ndarray], list[dict]]:
    extractor = CodebookExtractor.from_spec(parse_spec("vlad:rootsift/k=16/side=480/max=800"))
    paths = sorted((museum_sample / "images").glob("*.jpg"))
    prepared = [extractor.prepare(Image.open(p).convert("RGB")) for p in paths]
    extractor.fit(prepared)
    return extractor, prepared, json.loads((museum_sample / "queries.json").read_text())


def test_flat_images_never_outrank_real_matches(sample_descriptors, museum_sample: Path) -> None:  # noqa: ANN001
    """An image without keypoints stores a vector farther from every real query photo than any
    gallery image, the painting the photo shows included."""
    extractor, prepared, queries = sample_descriptors
    assert any(len(d) == 0 for d in prepared)  # the sample holds a real flat painting (bbdd_00001)
    gallery = extractor.embed(prepared)
    names = [p.name for p in sorted((museum_sample / "images").glob("*.jpg"))]
    null = extractor.embed([np.empty((0, 128), np.float32)])[0]
    for query in queries:
        q = extractor.embed([extractor.prepare(Image.open(museum_sample / query["query"]).convert("RGB"))])[0]
        relevant = gallery[names.index(Path(query["relevant"][0]).name)]
        assert np.linalg.norm(q - relevant) < 2 < np.linalg.norm(q - null)
        described = gallery[[len(d) > 0 for d in prepared]]
        assert np.linalg.norm(q - null) > np.linalg.norm(described - q, axis=1).max()


def test_a_whole_vlad_is_stored_whole_and_finds_the_painting(client, museum_sample: Path) -> None:  # noqa: ANN001
    """The whole encoding is the default (no PCA, whatever the sample's size). Past what HNSW indexes
    as ``vector``, an index asked for HNSW is refused with what does, and one created without
    ``--ann`` gets a first stage that takes the length (IVF-PQ); as ``halfvec`` HNSW takes it."""
    spec = "vlad:rootsift/k=24/side=480/max=800"
    with pytest.raises(ImgdbError, match="--storage halfvec"):
        client.create_index("vlad_whole", spec, ann="hnsw")
    long = client.create_index("vlad_whole", spec)
    assert (long.ann, long.ann_params["m"]) == ("ivfpq", 256)  # (3,072 = 256 sub-vectors of 12)
    client.drop_index("vlad_whole")
    info = client.create_index("vlad_whole", spec, storage="halfvec")
    assert (info.dim, info.ann, info.extractor) == (24 * 128, "hnsw", f"{spec}/dim=full")
    client.ingest([museum_sample / "images"], index="vlad_whole")
    extractor = client.catalog.extractor(client.index("vlad_whole"))
    assert extractor.reduced is None and not any(key.startswith("pca_") for key in extractor.state())
    queries = json.loads((museum_sample / "queries.json").read_text())
    found = [client.search(museum_sample / q["query"], index="vlad_whole", k=1)[0].uri for q in queries]
    assert sum(Path(uri).name == Path(q["relevant"][0]).name for uri, q in zip(found, queries)) >= 0.8 * len(queries)


def test_learned_state_survives_in_postgres_and_train_reencodes(client, museum_sample: Path) -> None:  # noqa: ANN001
    client.create_index("vlad_small", "vlad:rootsift/k=16/side=480/max=800")
    said: list[str] = []
    report = client.ingest([museum_sample / "images"], index="vlad_small", on_status=said.append)
    assert report.added == len(list((museum_sample / "images").glob("*.jpg")))
    # A first load this small teaches too little to be left as it is: the user is told what to run.
    assert f"'vlad_small' learned from only {report.added} images: once the collection has grown, " \
           "`imgdb index train vlad_small` learns again from it" in said
    query = museum_sample / "queries.json"
    photo = museum_sample / json.loads(query.read_text())[0]["query"]
    first = client.embed(photo, index="vlad_small")
    with imgdb.connect() as fresh:  # a new process would start like this: state comes from PostgreSQL
        np.testing.assert_allclose(fresh.embed(photo, index="vlad_small"), first, rtol=1e-5, atol=1e-6)
        hit = fresh.search(photo, index="vlad_small", k=1)[0]
        reencoded = fresh.train("vlad_small")
    assert reencoded is not None and reencoded.added == report.added and not reencoded.failed
    assert client.search(f"id:{hit.id}", index="vlad_small", k=1)[0].id == hit.id
